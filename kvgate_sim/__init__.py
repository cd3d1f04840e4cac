"""Simulated serving fleet (TEST AND BENCHMARK TOOL, not product code).

vLLM-shaped engines with real prefix-cache semantics and an LMCache-compatible controller.
Product modules (everything outside kvgate_sim and kvgate_bench) must never import this package.
"""
