"""Tooling off the inference path: the literal reference forward (a test oracle and a benchmark
baseline). Nothing in the pipeline imports it."""
