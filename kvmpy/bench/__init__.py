"""Benchmarks of kvmpy's exit path (`python -m kvmpy.bench.floor`)."""
