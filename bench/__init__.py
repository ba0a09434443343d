"""Benchmarks (not tests): ``python -m bench.throughput``; see docs/throughput.md."""
