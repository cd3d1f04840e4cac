"""The plugin index (Pixiu's ``pkg/pluginregistry``): importing this module registers every built-in filter kind,
and :func:`check_config` resolves a config's ``http_filters`` against the registered kinds.

:mod:`kvgate.chain` defines the extension point (:func:`~kvgate.chain.register_filter`) and knows no concrete
filter. A new built-in filter is a module that registers its kind, plus one import line here. The check runs
without a runtime (no sessions, no tasks), so ``kvgate check-config`` and :class:`kvgate.server.Gateway` share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kvgate.chain import FilterKind, get_kind, validate_filter_config
from kvgate.config import GatewayConfig, unknown_keys
from kvgate.errors import ConfigError
from kvgate.filters import kvcache, proxy

#: The built-in filter modules: importing them registered their kinds (one line per filter).
BUILTIN_MODULES = (kvcache, proxy)
BUILTIN_FILTERS = ("dgp.filter.ai.kvcache", "dgp.filter.llm.proxy")


@dataclass(frozen=True, slots=True)
class ResolvedFilter:
    """One ``http_filters`` entry: its kind and its validated config model."""

    kind: FilterKind[Any]
    config: BaseModel
    path: str  # ``listeners[i].filter_chains.filters[0].config.http_filters[j]``

    @property
    def name(self) -> str:
        return self.kind.name


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    config: GatewayConfig
    chains: list[list[ResolvedFilter]]  # per listener, in YAML order; the terminal filter last
    warnings: list[str] = field(default_factory=list)


def http_filters_path(listener_index: int) -> str:
    return f"listeners[{listener_index}].filter_chains.filters[0].config.http_filters"


def check_config(config: GatewayConfig) -> CheckedConfig:
    """Validate every listener's filter chain; raises :class:`ConfigError` naming the key path.

    Each filter must be a registered kind with a valid ``config``; exactly one terminal filter (the proxy), and
    it comes last. Unknown keys (in the gateway config and in filter configs) are returned as warnings.
    """
    warnings = [f"unknown key ignored: {k}" for k in unknown_keys(config)]
    chains: list[list[ResolvedFilter]] = []
    for li, lst in enumerate(config.listeners):
        base = http_filters_path(li)
        chain: list[ResolvedFilter] = []
        for fi, fc in enumerate(lst.hcm.http_filters):
            path = f"{base}[{fi}]"
            cfg = validate_filter_config(fc.name, fc.config, path)
            warnings.extend(f"unknown key ignored: {path}.config.{k}" for k in unknown_keys(cfg))
            kind = get_kind(fc.name)
            assert kind is not None  # validate_filter_config rejects unknown kinds
            chain.append(ResolvedFilter(kind, cfg, path))
        _check_terminal(chain, base)
        chains.append(chain)
    return CheckedConfig(config, chains, warnings)


def _check_terminal(chain: list[ResolvedFilter], base: str) -> None:
    """The terminal filter answers the request: exactly one, and the last http filter."""
    if not any(f.kind.terminal for f in chain):
        raise ConfigError(base, "no terminal filter: add dgp.filter.llm.proxy as the last http filter")
    for fi, f in enumerate(chain):
        if f.kind.terminal and fi != len(chain) - 1:
            raise ConfigError(
                f"{base}[{fi}].name",
                f"{f.name} answers the request, so it must be the last http filter (and appear once)",
            )
