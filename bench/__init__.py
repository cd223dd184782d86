"""Benchmarks: `make bench` runs all, `make bench ONLY=<name>` one of them."""
