"""Schema-constrained decoding with llguidance: generation can only produce JSON matching the schema.

A JSON schema is compiled into a matcher once (`GrammarCache`) and deep-copied for each request. In a
batch, each row has its own matcher or none (`SchemaLogitsProcessor`), so rows with different schemas,
and free-text rows, share one `generate` call.
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


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 words -> [B, V] bool, bit i of word j allowing token 32*j + i."""
    shifts = torch.arange(32, dtype=torch.int32)
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
