"""The shim headers (*.cuh) every ikport kernel includes; installed as package data."""
