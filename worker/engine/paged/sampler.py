"""Next tokens for a step's sampling rows, each with its own settings, in one pass on the device.

Per row: repetition penalty over every token the sequence holds (prompt included, as transformers
applies it), the grammar's mask, then greedy argmax or temperature and top-p sampling. The order is
transformers' (penalty, logits processors, temperature, top-p), so greedy rows match its `generate`.
Which tokens a row has seen is kept on the device, one boolean row per running sequence, so the penalty
never walks token lists on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.paged.sequence import Sequence


@dataclass
class SamplingBatch:
    """The settings of the rows being sampled, as device tensors."""

    rows: torch.Tensor  # [S] the sequences' slots in the seen-token table
    penalty: torch.Tensor | None  # [S, 1]; None when no row is penalised
    temperature: torch.Tensor | None  # [S, 1]; None when every row is greedy
    top_p: torch.Tensor | None  # [S, 1]
    is_greedy: torch.Tensor | None  # [S]

    @classmethod
    def of(cls, seqs: list[Sequence], device: torch.device) -> "SamplingBatch":
        rows = torch.tensor([s.row for s in seqs], dtype=torch.long).to(device, non_blocking=True)
        options = [s.options for s in seqs]
        penalised = any(o.repetition_penalty != 1.0 for o in options)
        sampled = any(not o.is_greedy for o in options)

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)[:, None]

        return cls(
            rows=rows,
            penalty=column([o.repetition_penalty for o in options]) if penalised else None,
            temperature=column([o.temperature if not o.is_greedy else 1.0 for o in options]) if sampled else None,
            top_p=column([o.top_p for o in options]) if sampled else None,
            is_greedy=torch.tensor([o.is_greedy for o in options]).to(device, non_blocking=True) if sampled else None)


class Sampler:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.seen = torch.zeros((max_rows, vocab_size), dtype=torch.bool, device=device)

    def start_rows(self, seqs: list[Sequence]) -> None:
        """Mark every token of sequences that just got a slot (a new or resumed request) as seen."""
        for seq in seqs:
            row = self.seen[seq.row]
            row.zero_()
            row[torch.tensor(seq.token_ids, dtype=torch.long).to(row.device, non_blocking=True)] = True
            seq.is_row_fresh = False

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """logits [S, V] float32 (modified in place) -> next tokens [S]. `allowed` [S, V] bool is the
        grammar's mask (None: no row is constrained)."""
        if batch.penalty is not None:
            # transformers: score < 0 -> score * penalty, else score / penalty, on tokens already present
            penalised = torch.where(logits < 0, logits * batch.penalty, logits / batch.penalty)
            logits = torch.where(self.seen[batch.rows, :logits.shape[1]], penalised, logits)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        tokens = logits.argmax(dim=-1)
        if batch.temperature is not None:
            tokens = torch.where(batch.is_greedy, tokens, _sample_top_p(logits / batch.temperature, batch.top_p))
        self.seen[batch.rows, tokens] = True
        return tokens


def _sample_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability reaches `top_p` (per row), as transformers'
    TopPLogitsWarper keeps them."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[:, -1] = False  # keep at least the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = torch.empty_like(logits).scatter_(1, order, sorted_logits.softmax(dim=-1))
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a host sync.
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
