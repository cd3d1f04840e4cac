"""Go-style duration strings ("50ms", "2s", "1m30s", "1.5h") as used in Pixiu configs."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(value: object) -> float:
    """Seconds from a Go duration string, or a YAML number (seconds). Raises ``ValueError``.

    Like Go's ``time.ParseDuration``, a string needs a unit on every number ("5" is an error, "5s" is not);
    only "0" may go without one.
    """
    if isinstance(value, bool):
        raise ValueError("duration must be a string like '50ms' or '2s'")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError("duration must be a string like '50ms' or '2s'")
    text = value.strip()
    if text in ("0", ""):
        return 0.0
    sign = 1.0
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    pos = 0
    total = 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        if _NUMBER.fullmatch(text[pos:]):
            raise ValueError(f"invalid duration {value!r}: missing unit (Go syntax such as '5s' or '50ms')")
        raise ValueError(f"invalid duration {value!r} (use Go syntax such as '50ms', '2s', '10m')")
    return sign * total


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
