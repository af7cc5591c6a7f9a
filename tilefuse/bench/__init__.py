"""Benchmark harness (``tilefuse bench``); see the benchmark issue."""
