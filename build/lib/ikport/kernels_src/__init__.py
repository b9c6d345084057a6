"""Kernel sources (*.cuh) and manifest.yaml; installed as package data, compiled at run time."""
