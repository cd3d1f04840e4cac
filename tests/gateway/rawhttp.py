"""Raw-socket HTTP/1.1 helpers for tests: send bytes exactly as written (no client library normalising them)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# a client's WebSocket handshake headers (the gateway serves no upgrades: it must answer 400)
WEBSOCKET_UPGRADE = (
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
)


@dataclass
class RawAnswer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def is_openai_error(self) -> bool:
        try:
            err = self.json()["error"]
        except (ValueError, KeyError, TypeError):
            return False
        return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


def parse_answer(raw: bytes) -> RawAnswer:
    if not raw:
        return RawAnswer(None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        rest = body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        body = out
    return RawAnswer(status, headers, body)


async def exchange(
    port: int, data: bytes | list[bytes], *, gap_s: float = 0.0, read_timeout: float = 15.0
) -> RawAnswer:
    """Send ``data`` (pieces ``gap_s`` apart) while reading; read until the server closes; the parsed answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks: list[bytes] = []

    async def read_all() -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                chunks.append(chunk)
        except (ConnectionError, OSError):
            return

    reading = asyncio.create_task(read_all())
    try:
        pieces = data if isinstance(data, list) else [data]
        try:
            for i, piece in enumerate(pieces):
                if i and gap_s:
                    await asyncio.sleep(gap_s)
                if reading.done():
                    break  # the server answered and closed
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server refused early; read what it said
        try:
            await asyncio.wait_for(asyncio.shield(reading), read_timeout)
        except TimeoutError:
            pass
        return parse_answer(b"".join(chunks))
    finally:
        reading.cancel()
        writer.close()


def request(method: str, target: str, body: bytes = b"", *headers: str, close: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


class LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        """ERROR records and any record with a traceback."""
        return [
            f"{r.levelname} {r.name}: {r.getMessage()}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info
        ]

    def warnings(self, contains: str = "") -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == logging.WARNING and contains in r.getMessage()]


@contextmanager
def collect_logs() -> Iterator[LogCollector]:
    """Records of kvgate and uvicorn (uvicorn's loggers do not propagate to the root logger)."""
    h = LogCollector()
    loggers = [logging.getLogger()]
    if not logging.getLogger("uvicorn").propagate:
        loggers.append(logging.getLogger("uvicorn"))
    kv = logging.getLogger("kvgate")
    old_level = kv.level
    kv.setLevel(logging.INFO)
    for lg in loggers:
        lg.addHandler(h)
    try:
        yield h
    finally:
        for lg in loggers:
            lg.removeHandler(h)
        kv.setLevel(old_level)
