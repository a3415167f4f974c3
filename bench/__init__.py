"""Benchmark suite: adapter-supervisor against supervisord and circus (see README.md)."""
