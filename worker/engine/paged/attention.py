"""Attention over the paged KV cache, in plain PyTorch (the paged engine runs on a CPU; on a GPU, vLLM's kernels).

A backend is planned once per step (`plan(inputs)`) and returns the callable every layer uses:
`attend(layer, q [N, heads, dim], k, v [N, kv_heads, dim]) -> [N, heads, dim]`. It first writes the
step's keys and values into their slots, then attends each new token to its sequence's cached tokens
up to and including itself (causal, aligned to the end of the sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine.paged.kv_cache import KVCache
from worker.engine.paged.step_inputs import StepInputs

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DECODE_GROUP_RATIO = 2.0  # decode rows share a padded call while the longest is at most twice the shortest


@dataclass(frozen=True)
class HeadShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


class TorchAttention:
    """Gathers each sequence's keys and values from its blocks and calls SDPA (grouped heads natively).

    Decode rows of similar lengths share a padded call (`decode_groups`); prompt chunks run one sequence at a
    time. Correct everywhere and fast enough for a small model on a CPU."""

    name = "torch"

    def __init__(self, cache: KVCache, heads: HeadShape, group_ratio: float = DECODE_GROUP_RATIO) -> None:
        self.cache = cache
        self.heads = heads
        self.group_ratio = group_ratio  # decode rows' grouping (`decode_groups`); infinite: one padded group

    def plan(self, inputs: StepInputs) -> Attend:
        block_size = self.cache.shape.block_size
        q_lens = np.diff(inputs.qo_indptr)
        slots = [self._slots(inputs, row, block_size) for row in range(inputs.num_seqs)]
        decode = [row for row in range(inputs.num_seqs) if q_lens[row] == 1]
        chunks = [row for row in range(inputs.num_seqs) if q_lens[row] > 1]
        device = self.cache.data.device
        decode_batches = [_padded_decode(group, inputs, slots, device)
                          for group in decode_groups([len(slots[row]) for row in decode], decode, self.group_ratio)]
        chunk_plans = [(int(inputs.qo_indptr[row]), int(q_lens[row]), slots[row].to(device)) for row in chunks]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.cache.write(layer, inputs.slot_mapping, k, v)
            flat = (-1, self.heads.num_kv_heads, self.heads.head_dim)
            keys, values = self.cache.keys(layer).view(flat), self.cache.values(layer).view(flat)
            out = torch.empty_like(q)
            for rows, gather, mask in decode_batches:
                key = _gather(keys, gather, q.dtype).transpose(1, 2)  # [B, kv_heads, L, dim]
                value = _gather(values, gather, q.dtype).transpose(1, 2)
                out[rows] = _decode(q[rows], key, value, mask, self.heads.scale)
            for start, length, gather in chunk_plans:
                query = q[start:start + length].transpose(0, 1).unsqueeze(0)  # [1, heads, q, dim]
                key = _gather(keys, gather, q.dtype).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, kv, dim]
                value = _gather(values, gather, q.dtype).transpose(0, 1).unsqueeze(0)
                out[start:start + length] = _causal(query, key, value, self.heads.scale)[0].transpose(0, 1)
            return out

        return attend

    @staticmethod
    def _slots(inputs: StepInputs, row: int, block_size: int) -> torch.Tensor:
        pages = inputs.kv_indices[inputs.kv_indptr[row]:inputs.kv_indptr[row + 1]].astype(np.int64)
        span = np.arange(inputs.kv_lens[row])
        return torch.from_numpy(pages[span // block_size] * block_size + span % block_size)


def decode_groups(lengths: list[int], rows: list[int], max_ratio: float = DECODE_GROUP_RATIO) -> list[list[int]]:
    """`rows` (whose sequences hold `lengths` tokens) in groups of similar lengths, longest first: a group's
    shortest row is at least its longest / `max_ratio`. Decode rows are padded to their group's longest, so a
    7,800-token chunk's row no longer makes 25 rows of 900 tokens read 8 times their keys and values; each group
    costs a few more operations per layer, and lengths within a factor of `max_ratio` share one."""
    groups: list[list[int]] = []
    longest = 0
    for length, row in sorted(zip(lengths, rows), reverse=True):
        if not groups or length * max_ratio < longest:
            groups.append([])
            longest = length
        groups[-1].append(row)
    return groups


def _padded_decode(rows: list[int], inputs: StepInputs, slots: list[torch.Tensor], device: torch.device):
    """Token rows, a [B, L] gather of cache slots padded with slot 0, and a mask hiding the padding (None
    when every sequence has the same length)."""
    lengths = [len(slots[row]) for row in rows]
    longest = max(lengths)
    gather = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        gather[i, :lengths[i]] = slots[row]
    mask = None
    if min(lengths) != longest:
        mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :].to(device)
    token_rows = torch.from_numpy(inputs.qo_indptr[rows].astype(np.int64)).to(device)
    return token_rows, gather.to(device), mask


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [S, kv_heads, dim] at `slots` (any shape) -> [*slots.shape, kv_heads, dim] in `dtype` (an fp8 cache
    is upcast). `index_select` over the flattened slots: on a CPU about ten times faster than indexing."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:]).to(dtype)


def _decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """One new token per sequence: query [B, heads, dim] against key, value [B, kv_heads, L, dim] -> [B, heads, dim].

    On a GPU, SDPA. On a CPU, two batched products with each key/value head's group of query heads side by
    side and the softmax in float32: SDPA's one-token path in bfloat16 is ten times slower there, while on an
    H200 these products take 2.8 times SDPA's time (1.61 against 0.58 ms a layer at 256 rows of 1,280 tokens).
    Keys and values are copied whole first: a CPU's product over the strided view is slower than the copy."""
    if query.device.type != "cpu":
        return F.scaled_dot_product_attention(query.unsqueeze(2), key, value, attn_mask=mask, scale=scale,
                                              enable_gqa=True).squeeze(2)
    batch, num_heads, dim = query.shape
    num_kv_heads = key.shape[1]
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, dim)  # head h reads kv head h // group
    scores = torch.matmul(grouped, key.contiguous().transpose(-1, -2)).float() * scale  # [B, kv_heads, group, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(weights, value.contiguous()).view(batch, num_heads, dim)


def _causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last `q` positions of a `kv`-long sequence."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == kv_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    allowed = torch.arange(kv_len, device=query.device)[None, :] <= (
        torch.arange(q_len, device=query.device)[:, None] + kv_len - q_len)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=True)
