"""A scheduled step packed for the model: every sequence's new tokens in one row, no padding."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worker.engine.paged.scheduler import ScheduledStep


@dataclass
class StepInputs:
    """Token-major tensors on the device, and the per-sequence layout on the host (int32 arrays, as the
    attention kernels' planners take them)."""

    input_ids: torch.Tensor  # [N] the tokens computed this step, sequence after sequence
    positions: torch.Tensor  # [N] their positions in their sequences
    slot_mapping: torch.Tensor  # [N] where their keys and values go: block * block_size + offset
    host_tokens: torch.Tensor  # [3, N] the three rows above on the host (what tensor-parallel followers receive)
    logits_indices: torch.Tensor  # [S] the rows whose logits are sampled (each sampling sequence's last token)
    sample_rows: list[int]  # [S] which sequences of the step those are
    qo_indptr: np.ndarray  # [B + 1] where each sequence's tokens start in the packed row
    kv_lens: np.ndarray  # [B] tokens in each sequence's cache once this step has written
    kv_indptr: np.ndarray  # [B + 1] where each sequence's pages start in kv_indices
    kv_indices: np.ndarray  # the blocks holding those tokens, sequence after sequence
    kv_last_page_len: np.ndarray  # [B] tokens in each sequence's last block
    is_decode_only: bool

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

    @classmethod
    def build(cls, step: ScheduledStep, block_size: int, device: torch.device) -> "StepInputs":
        ids, positions, slots, sample_rows, logits_indices = [], [], [], [], []
        q_lens, kv_lens, pages = [], [], []
        offset = 0
        for row, (seq, count) in enumerate(zip(step.seqs, step.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + count
            table = seq.block_table
            if count == 1:  # a decode, or a prompt's last token: no arrays needed
                ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                span = np.arange(start, end)
                ids.extend(seq.token_ids[start:end])
                positions.extend(span.tolist())
                slots.extend((np.asarray(table)[span // block_size] * block_size + span % block_size).tolist())
            offset += count
            if end == seq.num_tokens:
                sample_rows.append(row)
                logits_indices.append(offset - 1)
            q_lens.append(count)
            kv_lens.append(end)
            pages.append(table[:-(-end // block_size)])
        kv_lens_np = np.asarray(kv_lens, dtype=np.int32)
        num_pages = -(-kv_lens_np // block_size)
        host_tokens = torch.tensor([ids, positions, slots], dtype=torch.long)
        packed = host_tokens.to(device, non_blocking=True)
        return cls(
            input_ids=packed[0], positions=packed[1], slot_mapping=packed[2], host_tokens=host_tokens,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(device, non_blocking=True),
            sample_rows=sample_rows,
            qo_indptr=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
            kv_lens=kv_lens_np,
            kv_indptr=np.concatenate([[0], np.cumsum(num_pages)]).astype(np.int32),
            kv_indices=np.fromiter((b for table in pages for b in table), dtype=np.int32, count=int(num_pages.sum())),
            kv_last_page_len=(kv_lens_np - (num_pages - 1) * block_size).astype(np.int32),
            is_decode_only=step.is_decode_only)
