"""Schema-constrained decoding with llguidance: generation can only produce JSON matching the schema.

A JSON schema is compiled into a matcher once (`GrammarCache`) and deep-copied for each request. Each
row of a batch has its own matcher or none, so rows with different schemas, and free-text rows, share a
step: the paged engine fills every constrained row's mask at once on llguidance's threads while the GPU
runs the forward pass (`TokenMasks`); the static engine masks inside `generate` (`SchemaLogitsProcessor`).
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor


class GrammarCache:
    """Matchers compiled once per JSON schema (keyed by its text) for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    def matcher(self, schema_json: str) -> Any:
        """A fresh matcher for `schema_json`; raises ValueError for a schema llguidance cannot compile."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(schema_json)
            if compiled is None:
                # Compact JSON: no free whitespace, so no tokens go to indentation.
                grammar = LLMatcher.grammar_from_json_schema(schema_json, overrides={"whitespace_flexible": False})
                compiled = LLMatcher(self._tokenizer, grammar, log_level=0)
                if compiled.is_error():
                    raise ValueError(f"cannot compile the JSON schema: {compiled.get_error()}")
                self._compiled[schema_json] = compiled
        return compiled.deep_copy()


class TokenMasks:
    """The next-token masks of a step's rows, and the step's tokens fed back to their matchers, each done
    for all constrained rows at once on llguidance's thread pool."""

    def __init__(self, max_rows: int, vocab_size: int) -> None:
        import llguidance
        import llguidance.torch

        self.vocab_size = vocab_size
        self._executor = llguidance.LLExecutor()
        self._bitmask = llguidance.torch.allocate_token_bitmask(max_rows, vocab_size)  # pinned when CUDA is up
        self._fill = llguidance.torch.fill_next_token_bitmask_par
        self._consume = llguidance.torch.consume_token_par

    def allowed(self, matchers: Sequence[Any | None], device: torch.device) -> torch.Tensor | None:
        """[rows, vocab] bool on `device`, True where a row may go next (every token for a free row); None
        when no row is constrained."""
        pairs = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
        if not pairs:
            return None
        bitmask = self._bitmask[:len(matchers)]
        bitmask.fill_(-1)
        self._fill(self._executor, pairs, self._bitmask)
        return _unpack(bitmask.to(device, non_blocking=True), self.vocab_size)

    def advance(self, matchers: Sequence[Any | None], tokens: Sequence[int]) -> None:
        """Feed each constrained row its sampled token (a matcher left in error says why on its own)."""
        pairs = [(matcher, token) for matcher, token in zip(matchers, tokens) if matcher is not None]
        if pairs:
            self._consume(self._executor, pairs)


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 words -> [B, V] bool, bit i of word j allowing token 32*j + i."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks each constrained row's logits to the tokens its grammar allows next.

    `matchers[i]` is None for a free row. The processor consumes each row's previous token itself, so
    it needs the prompt width to know where generation started."""

    def __init__(self, matchers: Sequence[Any | None], prompt_width: int, vocab_size: int) -> None:
        import llguidance.torch

        self.matchers = list(matchers)
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.prompt_width = prompt_width
        self.vocab_size = vocab_size
        self._bitmask = llguidance.torch.allocate_token_bitmask(len(self.matchers), vocab_size)
        self._fill = llguidance.torch.fill_next_token_bitmask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_width:
            last = input_ids[:, -1].tolist()
            for row in self.rows:
                if not self.matchers[row].is_stopped():
                    self.matchers[row].consume_token(last[row])
        for row in self.rows:
            self._fill(self.matchers[row], self._bitmask, row)
        allowed = _unpack(self._bitmask[self.rows], self.vocab_size).to(scores.device)  # [R, V]
        rows = torch.tensor(self.rows, device=scores.device)
        width = min(scores.shape[1], self.vocab_size)
        constrained = scores[rows]
        constrained[:, :width] = constrained[:, :width].masked_fill(~allowed[:, :width], float("-inf"))
        constrained[:, width:] = float("-inf")
        scores[rows] = constrained
        return scores
