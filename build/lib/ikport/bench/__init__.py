"""Benchmarks of ikport beside its peers, in one process; results go to docs/results/ as JSON."""
