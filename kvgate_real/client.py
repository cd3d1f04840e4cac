"""Stdlib HTTP helpers for the real engines and the real controller (loopback only, never via a proxy)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

from kvgate_real.locations import CHUNK_SIZE, MODEL_NAME, FleetError

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never route loopback calls via a proxy


# -- HTTP helpers (stdlib) -----------------------------------------------------------------------------------------
def http_json(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One JSON request; returns (status, parsed body or text).  Connection errors raise ``OSError``."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def http_text(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _OPENER.open(urllib.request.Request(url), timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _ok_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> Any:
    status, data = http_json(method, url, body, timeout)
    if status != 200:
        raise FleetError(f"{method} {url} -> {status}: {str(data)[:500]}")
    return data


def tokenize(
    engine_url: str,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """The engine's own token ids: a prompt gets the BOS (id 0); chat ``messages`` get none."""
    body: dict[str, Any] = {"model": MODEL_NAME}
    if messages is not None:
        body.update(messages=messages, add_generation_prompt=add_generation_prompt)
    else:
        body["prompt"] = prompt
    return list(_ok_json("POST", f"{engine_url}/tokenize", body)["tokens"])


def complete(engine_url: str, prompt: str, max_tokens: int = 4, timeout: float = 120.0) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return dict(_ok_json("POST", f"{engine_url}/v1/completions", body, timeout))


def chat(
    engine_url: str, messages: list[dict[str, str]], max_tokens: int = 4, timeout: float = 120.0
) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return dict(_ok_json("POST", f"{engine_url}/v1/chat/completions", body, timeout))


def lookup(controller_url: str, tokens: list[int], timeout: float = 30.0) -> dict[str, tuple[str, int]]:
    """Controller ``/lookup``: instance id -> (location, end token of the last chunk credited to it)."""
    data = _ok_json("POST", f"{controller_url}/lookup", {"tokens": tokens}, timeout)
    return {k: (str(v[0]), int(v[1])) for k, v in (data.get("layout_info") or {}).items()}


def wait_for_lookup(
    controller_url: str,
    tokens: list[int],
    instance_id: str,
    min_tokens: int = CHUNK_SIZE,
    timeout: float = 20.0,
    interval: float = 0.5,
) -> dict[str, tuple[str, int]]:
    """Poll ``/lookup`` until ``instance_id`` is credited with at least ``min_tokens``; returns the last layout."""
    deadline = time.monotonic() + timeout
    layout: dict[str, tuple[str, int]] = {}
    while True:
        layout = lookup(controller_url, tokens)
        if instance_id in layout and layout[instance_id][1] >= min_tokens:
            return layout
        if time.monotonic() > deadline:
            raise FleetError(f"/lookup never credited {instance_id} with >= {min_tokens} tokens: {layout}")
        time.sleep(interval)


def workers(controller_url: str) -> list[dict[str, Any]]:
    return list(_ok_json("GET", f"{controller_url}/controller/workers", timeout=10).get("workers") or [])


def metrics(url: str) -> dict[str, float]:
    """Prometheus text -> metric name (labels dropped) -> sum over its samples."""
    status, text = http_text(f"{url}/metrics")
    if status != 200:
        raise FleetError(f"GET {url}/metrics -> {status}")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = re.split(r"[{\s]", line, maxsplit=1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out
