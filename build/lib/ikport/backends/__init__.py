"""Compile, load and launch: one interface (base.Backend), one module per vendor."""
