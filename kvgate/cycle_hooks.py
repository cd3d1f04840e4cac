"""What kvgate's HTTP protocol (:mod:`kvgate.httpproto`) offers the application for one request, and the stand-in
transport that writes a whole response's head and body in one send."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Connection(Protocol):
    """What the hooks use of their connection's protocol (kvgate.httpproto.GatewayHttpProtocol)."""

    _on_lost: dict[Any, CycleHooks]

    def _abort(self, cycle: Any) -> None: ...

    def _watch(self, cycle: Any, hooks: CycleHooks) -> None: ...

    def _hold_head(self, cycle: Any) -> None: ...


class CycleHooks:
    """What kvgate's server offers the application for one request, as ``scope["extensions"]["kvgate.hooks"]``."""

    __slots__ = ("_cycle", "_protocol", "_task", "lost")

    def __init__(self, protocol: Connection, cycle: Any):
        self._protocol = protocol
        self._cycle = cycle
        self._task: asyncio.Task[Any] | None = None
        self.lost = False  # the connection was lost before the response completed

    def abort(self) -> None:
        """Drop the connection of a response that cannot be completed (uvicorn then logs nothing)."""
        self._protocol._abort(self._cycle)

    def cancel_on_disconnect(self, task: asyncio.Task[Any]) -> CycleHooks:
        """Cancel ``task`` (and set :attr:`lost`) if the connection is lost before the response completed, until
        :meth:`stop`: no watcher task, no callback per request."""
        self._task = task
        self._protocol._watch(self._cycle, self)
        return self

    def stop(self) -> None:
        self._task = None
        self._protocol._on_lost.pop(self._cycle, None)

    def _connection_lost(self) -> None:
        if self._task is not None and not self.lost:
            self.lost = True
            self._task.cancel()

    def head_with_body(self) -> None:
        """The application's next two sends are a whole response (head, then the complete body): uvicorn's two
        writes go out as one (one send and one packet fewer per answer)."""
        self._protocol._hold_head(self._cycle)


class HeadWithBody:
    """The transport as one response cycle sees it while its head is held: uvicorn writes a response's head and
    its body separately (two sends, two packets); the head is kept until the body's write and both go out in
    one. Then the cycle has the transport itself again. Closing first writes what is held."""

    __slots__ = ("_cycle", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any):
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = data
            return
        self._cycle.transport = self._transport
        self._transport.write(self._held + data)
        self._held = None

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._cycle.transport = self._transport
        if self._held is not None and not self._transport.is_closing():
            self._transport.write(self._held)
        self._held = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
