"""The eager paths behind the public functions and their custom ops (the implementation layer)."""
