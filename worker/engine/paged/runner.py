"""Runs one scheduled step: pack it, run the model, sample the rows that reach the end of their tokens."""
from __future__ import annotations

from typing import Any

import torch

from worker.engine.grammar import TokenMasks
from worker.engine.paged.kv_cache import KVCache
from worker.engine.paged.model import DecoderModel
from worker.engine.paged.sampler import Sampler, SamplingBatch
from worker.engine.paged.scheduler import ScheduledStep
from worker.engine.paged.step_inputs import StepInputs


class ModelRunner:
    def __init__(self, model: DecoderModel, cache: KVCache, attention: Any, *, max_num_seqs: int) -> None:
        self.model = model
        self.cache = cache
        self.attention = attention  # a TorchAttention over `cache`
        self.device = model.device
        self.sampler = Sampler(max_num_seqs, model.vocab_size, self.device)
        self.masks = TokenMasks(max_num_seqs, model.vocab_size)

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[int | None]:
        """The token sampled for each sequence of the step (None where a prompt is still being computed)."""
        inputs = StepInputs.build(step, self.cache.shape.block_size, self.device)
        self.sampler.start_rows([seq for seq in step.seqs if seq.is_row_fresh])
        logits = self._forward(inputs)
        sampling = [step.seqs[row] for row in inputs.sample_rows]
        sampled: list[int | None] = [None] * len(step.seqs)
        if not sampling:
            return sampled
        matchers = [seq.matcher for seq in sampling]
        allowed = self.masks.allowed(matchers, self.device)
        tokens = self.sampler(logits, SamplingBatch.of(sampling, self.device), allowed).tolist()
        self.masks.advance(matchers, tokens)
        for row, token in zip(inputs.sample_rows, tokens):
            sampled[row] = token
        return sampled

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [S, vocab] of the sampling rows."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.attention.plan(inputs))
        return self.model.compute_logits(hidden[inputs.logits_indices])
