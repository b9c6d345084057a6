"""ikport's version (a leaf module: the runtime layer puts it in every cache key)."""

__version__ = "0.1.0"
