"""The GPU engine: what a worker's tasks hand prompts to and wait on.

Two engines behind one seam, `engine.submit(ModelInput, max_new_tokens, GenerationOptions) -> Future`:
the paged engine (`paged_engine.py`: continuous batching over a paged KV cache, the default) and the
static-batch engine (`static_engine.py`: transformers' `generate`). `build_engine` picks one for the
loaded model. The heavy modules (torch) load only when an engine is built.
"""
from worker.engine.builder import build_engine
from worker.engine.request import Completion, EngineStats, GenerationOptions, ModelInput, RequestTooLarge

__all__ = ["build_engine", "Completion", "EngineStats", "GenerationOptions", "ModelInput", "RequestTooLarge"]
