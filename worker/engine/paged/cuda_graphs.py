"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, a step padded up to its bucket.

A decode step of a 7 B model launches some 400 kernels; replaying them as one graph takes the host's
launch time out of every step. Padding rows compute a token of the null block, which no sequence owns.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from worker.engine.paged.attention import FlashInferAttention
from worker.engine.paged.block_manager import NULL_BLOCK
from worker.engine.paged.model import DecoderModel
from worker.engine.paged.step_inputs import StepInputs

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch_size` (which is always one)."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


class DecodeGraphs:
    @torch.inference_mode()
    def __init__(self, model: DecoderModel, attention: FlashInferAttention, workspace: torch.Tensor, *,
                 max_batch_size: int) -> None:
        import flashinfer

        started = time.perf_counter()
        self.model = model
        self.attention = attention
        self.buckets = batch_buckets(max_batch_size)
        self.max_batch_size = max_batch_size
        device, size = model.device, self.buckets[-1]
        max_pages = -(-model.max_model_len // attention.cache.shape.block_size)
        self._ids = torch.zeros(size, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, dtype=torch.long, device=device)
        self._slots = torch.zeros(size, dtype=torch.long, device=device)  # slot 0: the null block
        self._indptr = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self._indices = torch.zeros(size * max_pages, dtype=torch.int32, device=device)
        self._last_page_len = torch.ones(size, dtype=torch.int32, device=device)
        self._wrappers, self._graphs, self._logits = {}, {}, {}
        pool = None
        for bucket in reversed(self.buckets):  # largest first, so the smaller ones fit in its memory pool
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=self._indptr[:bucket + 1], paged_kv_indices_buffer=self._indices,
                paged_kv_last_page_len_buffer=self._last_page_len[:bucket])
            self._wrappers[bucket] = wrapper
            self._plan(bucket, np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))
            attend = attention.bind(wrapper, self._slots[:bucket])
            run = lambda: model.compute_logits(model(self._ids[:bucket], self._positions[:bucket], attend))  # noqa: E731
            run()  # compiles kernels and settles allocations outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bucket] = run()
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.buckets),
                 ",".join(map(str, self.buckets)), time.perf_counter() - started)

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only step of B <= max_batch_size sequences."""
        count = inputs.num_seqs
        bucket = next(b for b in self.buckets if b >= count)
        self._ids[:count].copy_(inputs.input_ids)
        self._positions[:count].copy_(inputs.positions)
        self._slots[:count].copy_(inputs.slot_mapping)
        # Padding rows write into the null block: stale slots there would overwrite a live sequence's cache.
        self._ids[count:bucket].zero_()
        self._positions[count:bucket].zero_()
        self._slots[count:bucket].zero_()
        self._plan(bucket, inputs.kv_indptr, inputs.kv_indices, inputs.kv_last_page_len)
        self._graphs[bucket].replay()
        return self._logits[bucket][:count]

    def _plan(self, bucket: int, indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray) -> None:
        """Plan the bucket's wrapper for the given rows plus padding rows of one null page each."""
        padding = bucket - (len(indptr) - 1)
        indptr = np.concatenate([indptr, indptr[-1] + np.arange(1, padding + 1)]).astype(np.int32)
        indices = np.concatenate([indices, np.full(padding, NULL_BLOCK)]).astype(np.int32)
        last_page_len = np.concatenate([last_page_len, np.ones(padding)]).astype(np.int32)
        shape, heads = self.attention.cache.shape, self.attention.heads
        self._wrappers[bucket].plan(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last_page_len),
                                    heads.num_heads, heads.num_kv_heads, heads.head_dim, shape.block_size,
                                    q_data_type=self.attention.q_dtype, kv_data_type=shape.dtype,
                                    sm_scale=heads.scale)
