"""Benchmarks: one command per figure, each printing a Markdown table and writing JSON (bench/report.py).

Run from a checkout as `python -m bench.<name>` or `python bench/<name>.py`.
"""
