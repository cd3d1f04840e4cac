"""Real fleet WITHOUT the gateway: real engines store into LMCache, the real controller's ``/lookup`` names them.

Id rules (reference real-vllm-lmcache-cpu.md §7): ``/lookup`` needs exactly the ids the engine saw: for a prompt
the ``/tokenize`` ids start with BOS 0; for chat ``/tokenize`` with ``messages`` gives ids without BOS.  Matches come
in whole 256-token chunks; the partial last chunk is never stored.

The last tests (controller restart, engine kill) change the session fleet, so they run last in this module.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from kvgate_real import fleet as real
from kvgate_real.fleet import RealFleet

pytestmark = pytest.mark.real

CHUNK = real.CHUNK_SIZE


def code_prompt(tag: str, lines: int = 70) -> str:
    """Python-like text (the tiny tokenizer was trained on Python): ~10 tokens per line, unique per tag."""
    salt = uuid.uuid4().hex[:8]
    body = "\n".join(f"def {tag}_{salt}_{k}(x):\n    return x * {k} + {len(tag) + k}" for k in range(lines))
    return f"# {tag} {salt}\n{body}\n"


def full_chunks(n_ids: int) -> int:
    return n_ids // CHUNK * CHUNK


def test_fleet_is_up_on_loopback(fleet: RealFleet) -> None:
    st = fleet.status()
    assert st["all_up"], st
    assert st["listeners"], "ss found no listening socket of the fleet"
    assert st["non_loopback"] == [], st["non_loopback"]
    ids = {w["instance_id"]: w for w in real.workers(fleet.controller_url)}
    for eng in fleet.engines:
        assert eng.instance_id in ids
        assert ids[eng.instance_id]["ip"] == "127.0.0.1"
        assert ids[eng.instance_id]["port"] == eng.worker_port


def test_tokenize_prompt_starts_with_bos(fleet: RealFleet) -> None:
    ids = real.tokenize(fleet.engines[0].url, "def main():\n    return 0\n")
    assert ids[0] == 0
    assert len(ids) > 3
    chat_ids = real.tokenize(fleet.engines[0].url, messages=[{"role": "user", "content": "hi"}])
    assert chat_ids[0] == 3, chat_ids[:4]  # <|im_start|>, no BOS


def test_completion_then_lookup_names_engine0(fleet: RealFleet) -> None:
    eng = fleet.engines[0]
    prompt = code_prompt("comp")
    ids = real.tokenize(eng.url, prompt)
    assert ids[0] == 0 and len(ids) >= 2 * CHUNK, len(ids)
    assert real.lookup(fleet.controller_url, ids) == {}

    out = real.complete(eng.url, prompt, max_tokens=4)
    assert out["usage"]["prompt_tokens"] == len(ids)

    layout = real.wait_for_lookup(fleet.controller_url, ids, eng.instance_id, full_chunks(len(ids)))
    assert set(layout) == {eng.instance_id}, layout
    location, end = layout[eng.instance_id]
    assert location == real.LOCATION
    assert end % CHUNK == 0 and end == full_chunks(len(ids)), (end, len(ids))
    # Without the BOS nothing matches; a 256-token prefix matches one chunk, 255 tokens none.
    assert real.lookup(fleet.controller_url, ids[1:]) == {}
    assert real.lookup(fleet.controller_url, ids[:CHUNK]) == {eng.instance_id: (real.LOCATION, CHUNK)}
    assert real.lookup(fleet.controller_url, ids[: CHUNK - 1]) == {}


def test_chat_then_lookup_names_serving_engine(fleet: RealFleet) -> None:
    eng = fleet.engines[-1]
    messages = [
        {"role": "system", "content": "You answer in Python."},
        {"role": "user", "content": code_prompt("chat")},
    ]
    ids = real.tokenize(eng.url, messages=messages)
    assert ids[0] != 0 and len(ids) >= 2 * CHUNK
    out = real.chat(eng.url, messages, max_tokens=4)
    assert out["usage"]["prompt_tokens"] == len(ids)
    layout = real.wait_for_lookup(fleet.controller_url, ids, eng.instance_id, full_chunks(len(ids)))
    assert layout[eng.instance_id][1] == full_chunks(len(ids)), layout
    # The next turn shares the stored prefix.
    more = [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    layout2 = real.lookup(fleet.controller_url, real.tokenize(eng.url, messages=more))
    assert layout2.get(eng.instance_id, ("", 0))[1] >= CHUNK, layout2


def test_pin_reaches_worker(fleet: RealFleet) -> None:
    eng = fleet.engines[0]
    prompt = code_prompt("pin")
    ids = real.tokenize(eng.url, prompt)
    real.complete(eng.url, prompt, max_tokens=1)
    real.wait_for_lookup(fleet.controller_url, ids, eng.instance_id, full_chunks(len(ids)))
    status, body = real.http_json(
        "POST",
        f"{fleet.controller_url}/pin",
        {"instance_id": eng.instance_id, "location": real.LOCATION, "tokens": ids},
    )
    assert status == 200, body
    assert body["num_tokens"] > 0, body
    assert body["num_tokens"] % CHUNK == 0


def test_prefix_cache_hits_move_on_repeat(fleet: RealFleet) -> None:
    eng = fleet.engines[0]
    prompt = code_prompt("hits")
    n_ids = len(real.tokenize(eng.url, prompt))
    real.complete(eng.url, prompt, max_tokens=1)
    before = real.metrics(eng.url)
    out = real.complete(eng.url, prompt, max_tokens=1)
    after = real.metrics(eng.url)
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits >= 128, hits  # whole 128-token CPU blocks
    assert hits <= n_ids
    details = out["usage"].get("prompt_tokens_details") or {}
    assert details.get("cached_tokens", 0) >= 128, out["usage"]


def test_lmcache_retrieval_after_prefix_cache_reset(fleet: RealFleet) -> None:
    """vLLM's own cache emptied: the repeat is served from LMCache (external hits) with identical greedy output."""
    eng = fleet.engines[0]
    prompt = code_prompt("reset")
    ids = real.tokenize(eng.url, prompt)
    first = real.complete(eng.url, prompt, max_tokens=8)
    real.wait_for_lookup(fleet.controller_url, ids, eng.instance_id, full_chunks(len(ids)))
    status, _ = real.http_json("POST", f"{eng.url}/reset_prefix_cache")
    assert status == 200
    before = real.metrics(eng.url)
    second = real.complete(eng.url, prompt, max_tokens=8)
    after = real.metrics(eng.url)
    ext = after.get("vllm:external_prefix_cache_hits_total", 0.0) - before.get(
        "vllm:external_prefix_cache_hits_total", 0.0
    )
    assert ext >= full_chunks(len(ids)) - CHUNK, ext
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


# -- lifecycle: these change the session fleet and must stay last ---------------------------------------------------
def test_controller_restart_reregisters_and_resyncs(fleet: RealFleet) -> None:
    eng = fleet.engines[0]
    prompt = code_prompt("restart")
    ids = real.tokenize(eng.url, prompt)
    real.complete(eng.url, prompt, max_tokens=1)
    real.wait_for_lookup(fleet.controller_url, ids, eng.instance_id, full_chunks(len(ids)))
    fleet.restart_controller()  # waits: heartbeat re-registration, full sync, a stored probe
    assert {w["instance_id"] for w in real.workers(fleet.controller_url)} >= {e.instance_id for e in fleet.engines}
    # The full sync brought the old keys back.
    real.wait_for_lookup(fleet.controller_url, ids, eng.instance_id, full_chunks(len(ids)), timeout=30)


def test_killed_engine_is_dropped(fleet: RealFleet) -> None:
    if len(fleet.engines) < 2:
        pytest.skip("needs 2 engines")
    victim = fleet.engines[-1]
    prompt = code_prompt("victim")
    ids = real.tokenize(victim.url, prompt)
    real.complete(victim.url, prompt, max_tokens=1)
    real.wait_for_lookup(fleet.controller_url, ids, victim.instance_id, CHUNK)
    fleet.kill_engine(len(fleet.engines) - 1, sig=signal.SIGKILL)  # a crash: nothing deregisters...
    assert real.pids_in_group(victim.pid) == []
    # ...until the controller's health check (interval 2 s, worker timeout 6 s) drops the worker and its keys.
    deadline = time.monotonic() + 30
    while real.lookup(fleet.controller_url, ids) or victim.instance_id in {
        w["instance_id"] for w in real.workers(fleet.controller_url)
    }:
        assert time.monotonic() < deadline, "dead engine still registered / credited by /lookup after 30 s"
        time.sleep(1)
    # The survivor still serves and stores.
    survivor = fleet.engines[0]
    prompt2 = code_prompt("survivor")
    ids2 = real.tokenize(survivor.url, prompt2)
    real.complete(survivor.url, prompt2, max_tokens=1)
    real.wait_for_lookup(fleet.controller_url, ids2, survivor.instance_id, CHUNK)
