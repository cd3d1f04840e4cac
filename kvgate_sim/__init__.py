"""Simulated serving fleet (TEST AND BENCHMARK TOOL, not product code; extra ``sim``).

vLLM-shaped engines with real prefix-cache semantics and an LMCache-compatible controller. The gateway package
``kvgate`` never imports this package (``tests/test_isolation.py``); the benchmark ``kvgate_bench`` drives it.
"""
