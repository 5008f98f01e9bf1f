"""Tooling off the inference path: the literal reference forward (a test oracle and a benchmark
baseline) and the cost model (FLOPs, bytes, predicted latency). Nothing in the pipeline imports it."""
