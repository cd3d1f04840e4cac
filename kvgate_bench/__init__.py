"""Benchmark and demo (TEST AND BENCHMARK TOOL, not product code; extra ``bench``).

Workloads, real-time and virtual-time runners, report. Drives the simulator ``kvgate_sim`` or a real fleet
(``kvgate_real``); uses the gateway's public pieces, never its CLI. The gateway never imports this package.
"""
