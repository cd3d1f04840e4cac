"""The admin application: ``/metrics``, ``/healthz``, ``/readyz`` and ``/config`` (secrets redacted).

With ``admin.token`` set, ``/metrics`` and ``/config`` need ``Authorization: Bearer <token>``; the probes
``/healthz`` and ``/readyz`` stay open (they reveal nothing).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from kvgate.asgi import Request, Router, Send, openai_error, send_json, send_response
from kvgate.config import GatewayConfig
from kvgate.metrics import Metrics
from kvgate.redact import redact_secrets


def admin_router(
    config: GatewayConfig,
    metrics: Metrics,
    ready: Callable[[], tuple[bool, dict[str, int]]],
    start_time: float,
) -> Router:
    """The admin routes; ``ready`` says whether the gateway serves and how many endpoints per cluster are
    healthy."""
    router = Router()

    async def metrics_h(req: Request, send: Send) -> None:
        await send_response(send, 200, metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    async def healthz(req: Request, send: Send) -> None:
        await send_json(send, 200, {"status": "ok", "uptime_s": round(time.time() - start_time, 3)})

    async def readyz(req: Request, send: Send) -> None:
        ok, healthy = ready()
        await send_json(send, 200 if ok else 503, {"ready": ok, "healthy_endpoints": healthy})

    async def config_h(req: Request, send: Send) -> None:
        await send_json(send, 200, redact_secrets(config.model_dump(mode="json", by_alias=False)))

    token = config.admin.token

    def guarded(handler: Any) -> Any:
        if not token:
            return handler
        expected = f"Bearer {token}".encode()

        async def check(req: Request, send: Send) -> None:
            got = (req.header("authorization") or "").encode("latin-1")
            if not hmac.compare_digest(got, expected):
                await send_json(
                    send,
                    401,
                    openai_error("admin token required", "unauthorized", 401),
                    headers=[(b"www-authenticate", b'Bearer realm="kvgate-admin"')],
                )
                return
            await handler(req, send)

        return check

    router.add("GET", "/metrics", guarded(metrics_h))
    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/config", guarded(config_h))
    return router
