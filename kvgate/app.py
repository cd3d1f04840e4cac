"""Start and stop a whole gateway (listeners + admin) inside a running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from dataclasses import dataclass, field

from kvgate.config import GatewayConfig
from kvgate.server import Gateway
from kvgate.serving import ServerHandle, start_server

log = logging.getLogger("kvgate")


@dataclass
class RunningGateway:
    gateway: Gateway
    listeners: list[ServerHandle]
    admin: ServerHandle | None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return self.listeners[0].url

    @property
    def admin_url(self) -> str:
        assert self.admin is not None
        return self.admin.url

    async def stop(self, drain_timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(h.stop(drain_timeout) for h in self.listeners), return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop(2.0)
        await self.gateway.close()


async def start_gateway(
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    admin_host: str | None = None,
    admin_port: int | None = None,
    with_admin: bool = True,
    log_level: str = "warning",
    drain_timeout: float = 10.0,
    reuse_port: bool = False,
) -> RunningGateway:
    """Serve every listener of ``config``. ``host``/``port`` override the first listener's address
    (``port=0`` = ephemeral); ``admin_port=0`` = ephemeral admin port. ``reuse_port``: bind with SO_REUSEPORT
    (one of several worker processes on the same ports)."""
    gw = Gateway(config)
    await gw.start()
    handles: list[ServerHandle] = []
    try:
        for i, (lst, app) in enumerate(zip(config.listeners, gw.listener_apps, strict=True)):
            addr = lst.address.socket_address
            h = host if host is not None else addr.address
            p = port if (port is not None and i == 0) else addr.port
            if h in ("0.0.0.0", "::"):
                log.warning(
                    "listener %s binds %s (all interfaces) as configured; use --host 127.0.0.1 to keep it on loopback",
                    lst.name,
                    h,
                )
            handles.append(
                await start_server(
                    app,
                    h,
                    p,
                    log_level=log_level,
                    timeout_graceful_shutdown=drain_timeout,
                    limits=app.server_limits(),
                    reuse_port=reuse_port,
                )
            )
        admin = None
        if with_admin:
            ah = admin_host or config.admin.address
            ap = admin_port if admin_port is not None else config.admin.port
            if not config.admin.token and not _is_loopback(ah):
                log.warning(
                    "admin binds %s (not loopback) without admin.token: /config and /metrics are open to "
                    "anyone who can reach it; set admin.token or bind 127.0.0.1",
                    ah,
                )
            admin = await start_server(gw.admin_app(), ah, ap, log_level=log_level, reuse_port=reuse_port)
    except BaseException:
        for hd in handles:
            with contextlib.suppress(Exception):
                await hd.stop(1.0)
        await gw.close()
        raise
    return RunningGateway(gw, handles, admin)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve_forever(running: RunningGateway, drain_timeout: float = 10.0) -> None:
    """Block until SIGINT/SIGTERM, then drain in-flight requests (up to ``drain_timeout``) and stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", drain_timeout)
    await running.stop(drain_timeout)
