"""Simulated LMCache 0.5.6 cache controller HTTP API (SIMULATOR: test and benchmark tool).

The ASGI layer over :class:`~kvgate_sim.controller_core.SimController` (state and commands); the request
models are in :mod:`kvgate_sim.controller_models`.

Same routes, status codes and bodies as the real controller (``lmcache/v1/api_server/__main__.py``
and ``internal_api_server/controller/*``), checked against it by ``tests/lmcache``:

- ``POST /lookup /query_instance /query_worker_info /health /clear /pin /compress /decompress
  /move /check_finish``, ``GET /controller/workers`` and ``GET /controller/key-stats``;
- 422 FastAPI-shaped bodies for bad bodies (validated with pydantic models identical to the real
  ones), 500 ``{"detail": "..."}`` with the real messages, 404 / 405 ``{"detail": ...}``;
- event ids ``<Op><uuid4>``.

Extension absent from real 0.5.6: ``POST /evict {"tokens", "instance_id", "location"?}`` → ``{"event_id",
"num_tokens"}`` (the contract of the Pixiu seed's controller client); it asks every worker of the
instance to evict the chunks of ``tokens``.

Engines are attached in-process: :meth:`SimController.register_worker` takes any
:class:`~kvgate_sim.protocol.WorkerControl`, and the engine reports admit/evict ops to
:attr:`SimController.op_sink`. Commands call the worker synchronously, so (unlike the real
controller, pitfall #8) a ``/clear`` has already updated the index when it returns.

Known divergences: ``instance_id: "all"`` / ``GET /controller/workers`` are not cached for 30 s; a
re-registering worker's control object is replaced (the real controller keeps its old socket); no
full-sync / heartbeat / P2P lookup machinery; ``compress``/``decompress`` with ``tokens: null`` pass
``[]`` to the worker; ``/move`` needs the destination registered with a ``peer_init_url`` (as the real
one needs P2P) and moves in-process via ``export_chunks`` / ``import_chunks``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, ValidationError

from kvgate.asgi import Receive, Request, Router, Scope, Send, send_json
from kvgate_sim.controller_core import ControllerError, SimController
from kvgate_sim.controller_index import WorkerInfo
from kvgate_sim.controller_models import (
    CheckFinishRequest,
    ClearRequest,
    CompressRequest,
    EvictRequest,
    HealthRequest,
    LookupRequest,
    MoveRequest,
    PinRequest,
    QueryInstRequest,
    QueryWorkerInfoRequest,
)


def _event_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4()}"


def _is_json_content_type(request: Request) -> bool:
    ctype = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


def _fastapi_errors(exc: ValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors(include_url=False):
        item = {"type": err["type"], "loc": ["body", *err["loc"]], "msg": err["msg"], "input": err["input"]}
        if "ctx" in err:
            item["ctx"] = {
                k: (v if isinstance(v, str | int | float | bool | None) else str(v)) for k, v in err["ctx"].items()
            }
        out.append(item)
    return out


def _not_a_dict(value: Any) -> list[dict[str, Any]]:
    return [
        {
            "type": "model_attributes_type",
            "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": value,
        }
    ]


class _BadBody(Exception):
    def __init__(self, detail: list[dict[str, Any]]):
        super().__init__("invalid body")
        self.detail = detail


M = TypeVar("M", bound=BaseModel)


async def _read_model(request: Request, model: type[M]) -> M:
    """Parse and validate a JSON body the way FastAPI does (raises :class:`_BadBody` with the 422 detail)."""
    raw = await request.body()
    if not raw:
        raise _BadBody([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    if not _is_json_content_type(request):
        raise _BadBody(_not_a_dict(raw.decode("utf-8", "replace")))
    try:
        data = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        msg = getattr(exc, "msg", "Expecting value")
        raise _BadBody(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", pos],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": msg},
                }
            ]
        ) from None
    if not isinstance(data, dict):
        raise _BadBody(_not_a_dict(data))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _BadBody(_fastapi_errors(exc)) from None


async def _fast_lookup_tokens(request: Request) -> list[int] | None:
    """Hot path for ``/lookup``: a well-formed body skips pydantic; anything odd returns None."""
    raw = await request.body()
    if not raw or not _is_json_content_type(request):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    tokens = data.get("tokens")
    if type(tokens) is not list or not all(type(t) is int for t in tokens):
        return None
    return tokens


class ControllerApp:
    """ASGI app of the simulated controller (405 answers carry an ``allow`` header, like FastAPI)."""

    def __init__(self, controller: SimController) -> None:
        self.controller = controller
        self.router = Router()
        self._methods: dict[str, list[str]] = {}
        post = {
            "/lookup": self._lookup,
            "/query_instance": self._query_instance,
            "/query_worker_info": self._query_worker_info,
            "/health": self._health,
            "/clear": self._clear,
            "/pin": self._pin,
            "/compress": self._compress,
            "/decompress": self._decompress,
            "/move": self._move,
            "/check_finish": self._check_finish,
            "/evict": self._evict,
        }
        for path, handler in post.items():
            self._add("POST", path, handler)
        self._add("GET", "/controller/workers", self._workers)
        self._add("GET", "/controller/key-stats", self._key_stats)

    def _add(self, method: str, path: str, handler: Callable[[Request, Send], Any]) -> None:
        self.router.add(method, path, self._wrap(handler))
        self._methods.setdefault(path, []).append(method)

    @staticmethod
    def _wrap(handler: Callable[[Request, Send], Any]) -> Callable[[Request, Send], Any]:
        async def run(request: Request, send: Send) -> None:
            try:
                await handler(request, send)
            except _BadBody as bad:
                await send_json(send, 422, {"detail": bad.detail})
            except ControllerError as err:
                await send_json(send, 500, {"detail": str(err)})

        return run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            allowed = self._methods.get(scope["path"])
            if allowed is not None and scope["method"] not in allowed:
                await send_json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", ", ".join(allowed).encode())])
                return
        await self.router(scope, receive, send)

    # ------------------------------------------------------------------ routes
    async def _lookup(self, request: Request, send: Send) -> None:
        tokens = await _fast_lookup_tokens(request)
        if tokens is None:
            tokens = (await _read_model(request, LookupRequest)).tokens
        layout = self.controller.lookup(tokens)
        await send_json(send, 200, {"event_id": _event_id("Lookup"), "layout_info": layout})

    async def _query_instance(self, request: Request, send: Send) -> None:
        req = await _read_model(request, QueryInstRequest)
        inst = self.controller.query_instance(req.ip)
        await send_json(send, 200, {"event_id": _event_id("QueryInst"), "res": inst})

    async def _query_worker_info(self, request: Request, send: Send) -> None:
        req = await _read_model(request, QueryWorkerInfoRequest)
        infos = self.controller.worker_infos(req.instance_id, req.worker_ids)
        await send_json(
            send,
            200,
            {
                "event_id": _event_id("QueryWorkerInfo"),
                "worker_infos": [i.as_dict() for i in infos],
            },
        )

    async def _health(self, request: Request, send: Send) -> None:
        req = await _read_model(request, HealthRequest)
        codes = self.controller.health(req.instance_id)
        body = {"event_id": _event_id("health"), "error_codes": {str(k): v for k, v in codes.items()}}
        await send_json(send, 200, body)

    async def _clear(self, request: Request, send: Send) -> None:
        req = await _read_model(request, ClearRequest)
        n = self.controller.clear(req.instance_id, req.location)
        await send_json(send, 200, {"event_id": _event_id("Clear"), "num_tokens": n})

    async def _pin(self, request: Request, send: Send) -> None:
        req = await _read_model(request, PinRequest)
        n = self.controller.pin(req.instance_id, req.location, req.tokens)
        await send_json(send, 200, {"event_id": _event_id("Pin"), "num_tokens": n})

    async def _compress(self, request: Request, send: Send) -> None:
        req = await _read_model(request, CompressRequest)
        n = self.controller.compress(req.instance_id, req.method, req.location, req.tokens)
        await send_json(send, 200, {"event_id": _event_id("Compress"), "num_tokens": n})

    async def _decompress(self, request: Request, send: Send) -> None:
        req = await _read_model(request, CompressRequest)
        n = self.controller.decompress(req.instance_id, req.method, req.location, req.tokens)
        await send_json(send, 200, {"event_id": _event_id("Decompress"), "num_tokens": n})

    async def _move(self, request: Request, send: Send) -> None:
        req = await _read_model(request, MoveRequest)
        n = self.controller.move(req.old_position, req.new_position, req.tokens, bool(req.should_copy))
        await send_json(send, 200, {"event_id": _event_id("Move"), "num_tokens": n})

    async def _check_finish(self, request: Request, send: Send) -> None:
        await _read_model(request, CheckFinishRequest)
        raise ControllerError("")  # not implemented in 0.5.6: always 500 {"detail": ""}

    async def _evict(self, request: Request, send: Send) -> None:
        req = await _read_model(request, EvictRequest)
        n = self.controller.evict(req.instance_id, req.tokens, req.location)
        await send_json(send, 200, {"event_id": _event_id("Evict"), "num_tokens": n})

    async def _workers(self, request: Request, send: Send) -> None:
        params = {k: v[-1] for k, v in parse_qs(request.query_string.decode("latin-1")).items()}
        instance_id = params.get("instance_id")
        worker_id: int | None = None
        if "worker_id" in params:
            try:
                worker_id = int(params["worker_id"].strip())
            except ValueError:
                await send_json(
                    send,
                    422,
                    {
                        "detail": [
                            {
                                "type": "int_parsing",
                                "loc": ["query", "worker_id"],
                                "msg": "Input should be a valid integer, unable to parse string as an integer",
                                "input": params["worker_id"],
                            }
                        ]
                    },
                )
                return
        index = self.controller.index
        with self.controller._lock:
            if instance_id is not None and worker_id is not None:
                info = index.worker_info(instance_id, worker_id)
                if info is None:
                    await send_json(send, 404, {"detail": f"Worker ({instance_id}, {worker_id}) not found"})
                    return
                await send_json(send, 200, {**info.as_dict(), "key_count": index.key_count(instance_id, worker_id)})
                return
            if instance_id is not None and not index.worker_ids(instance_id):
                await send_json(send, 404, {"detail": f"No workers found for instance {instance_id}"})
                return
            if instance_id is not None:  # the instance's workers in registration order (not sorted)
                infos: Sequence[WorkerInfo | None] = [
                    index.worker_info(i, w) for i, w in index.registered_workers() if i == instance_id
                ]
            else:
                infos = index.worker_infos("all")
            workers = [
                {**i.as_dict(), "key_count": index.key_count(i.instance_id, i.worker_id)}
                for i in infos
                if i is not None
            ]
        await send_json(send, 200, {"workers": workers, "total_count": len(workers)})

    async def _key_stats(self, request: Request, send: Send) -> None:
        with self.controller._lock:
            stats = self.controller.index.key_stats()
        await send_json(send, 200, stats)


def create_controller_app(controller: SimController | None = None) -> tuple[ControllerApp, SimController]:
    """The simulated controller's ASGI app and its state (serve it with ``kvgate.serving.start_server``)."""
    ctl = controller or SimController()
    return ControllerApp(ctl), ctl
