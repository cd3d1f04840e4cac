"""Simulated serving fleet (TEST AND BENCHMARK TOOL, not product code).

vLLM-shaped engines with real prefix-cache semantics and an LMCache-compatible controller.
Product modules (everything outside kvgate.sim and kvgate.bench) must never import this package.
"""
