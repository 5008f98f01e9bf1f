"""Benchmarks: one command per figure, each printing a Markdown table and writing JSON (bench/report.py).

Run from the checkout's root as `python -m bench.<name>`. What several benchmarks share is here once: the
models and their inputs (configs.py), random published-size weights (random_weights.py), timers
(timing.py), one rank in a fresh process (ranks.py; N ranks: parallel.spawn.run_ranks), this process's
memory (host_memory.py) and a server on loopback (server.py).
"""
