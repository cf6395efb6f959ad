"""The paged KV cache's memory: one tensor holding every layer's key and value blocks, and its sizing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.paged.block_manager import NULL_BLOCK


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Keys and values of `block_size` tokens in every layer."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def blocks_in(self, num_bytes: float) -> int:
        return int(num_bytes // self.bytes_per_block)


class KVCache:
    """`[layers, 2, blocks, block_size, kv_heads, head_dim]`: per layer, keys and values as
    `[blocks, block_size, kv_heads, head_dim]`."""

    def __init__(self, shape: CacheShape, num_blocks: int, device: torch.device | str) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        # empty, not zeros: a slot is always written before it is read, and on a CPU untouched pages
        # cost no memory. Except the null block, which the PyTorch path gathers (masked) as padding: recycled
        # memory there can hold NaN (any byte 0x7f or 0xff of an fp8 cache is one), and a masked NaN value still
        # makes the weighted sum NaN.
        self.data = torch.empty((shape.num_layers, 2, num_blocks, shape.block_size, shape.num_kv_heads,
                                 shape.head_dim), dtype=shape.dtype, device=device)
        self.data[:, :, NULL_BLOCK].zero_()

    def keys(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the new tokens' keys and values ([N, kv_heads, head_dim]) at their slots
        (block * block_size + offset), converted to the cache's dtype (an fp8 cache keeps no scale: keys and
        values are cast as they are, as vLLM does by default)."""
        flat = (-1, self.shape.num_kv_heads, self.shape.head_dim)
        dtype = self.shape.dtype
        key, value = key.to(dtype), value.to(dtype)
        if dtype.itemsize == 1:  # index_copy_ has no float8 kernel on a CPU: copy the bytes
            dtype = torch.uint8
            key, value = key.view(dtype), value.view(dtype)
        self.keys(layer).view(dtype).view(flat).index_copy_(0, slots, key)
        self.values(layer).view(dtype).view(flat).index_copy_(0, slots, value)

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()
