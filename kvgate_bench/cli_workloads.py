"""The workloads of a ``kvgate bench`` run, built from its options (TEST AND BENCHMARK TOOL).

:func:`build_workload` gives the token :class:`~kvgate_bench.workloads.Workload` for the real-time runners
(Mooncake beyond the trace's length is tiled as independent tenants); :func:`build_virtual_requests` gives the
virtual runner's hashed requests (:mod:`kvgate_bench.virtual_requests`; Mooncake uses the hash-only path).
"""

from __future__ import annotations

from typing import Any

TRACE_LEN_HINT = 12031


def _mooncake_records(params: dict[str, Any], n: int | None) -> list[dict[str, Any]]:
    from kvgate_bench.virtual_requests import tiled_mooncake_records
    from kvgate_bench.workloads import DEFAULT_TRACE_PATH, load_mooncake_trace

    path = params.get("path", DEFAULT_TRACE_PATH)
    want = n if n is not None else params.get("max_requests")
    records = load_mooncake_trace(path, None if want is None or want > TRACE_LEN_HINT else want)
    if want is not None and want > len(records):
        records = tiled_mooncake_records(records, want)
    return records[:want] if want is not None else records


def build_workload(name: str, params: dict[str, Any], requests: int | None, seed: int) -> Any:
    """The :class:`Workload` (token ids) for ``name`` with overrides; ``requests`` as documented in --help."""
    from kvgate_bench.workloads import WORKLOADS, get_workload, mooncake_from_records

    overrides = dict(params)
    overrides.setdefault("seed", seed)
    if name == "mooncake" and requests is not None and requests > TRACE_LEN_HINT:
        spec = WORKLOADS["mooncake"]
        kw = {**spec.defaults, **overrides}
        records = _mooncake_records(kw, requests)
        wl = mooncake_from_records(
            records, block_tokens_scale=kw["block_tokens_scale"], time_scale=kw["time_scale"], seed=kw["seed"],
            output_scale=kw["output_scale"], max_output_tokens=kw["max_output_tokens"],
            params={"path": str(kw["path"]), "max_requests": requests, "tiled": True},
        )  # fmt: skip
        wl.name = "mooncake"
        return wl
    if name == "mooncake" and requests is not None:
        overrides["max_requests"] = requests
    wl = get_workload(name, **overrides)
    if requests is not None and name != "mooncake":
        wl.requests = wl.requests[:requests]
    return wl


def build_virtual_requests(name: str, params: dict[str, Any], requests: int | None, seed: int) -> tuple[Any, Any]:
    """(vrequests, closed_loop) for the virtual runner; Mooncake uses the hash-only fast path."""
    from kvgate_bench.virtual_requests import mooncake_vrequests, prepare
    from kvgate_bench.workloads import WORKLOADS

    if name == "mooncake":
        kw = {**WORKLOADS["mooncake"].defaults, **params}
        records = _mooncake_records(kw, requests)
        vreqs = mooncake_vrequests(
            records, block_tokens_scale=kw["block_tokens_scale"], time_scale=kw["time_scale"],
            output_scale=kw["output_scale"], max_output_tokens=kw["max_output_tokens"],
        )  # fmt: skip
        return vreqs, None
    wl = build_workload(name, params, requests, seed)
    return prepare(wl), wl.closed_loop
