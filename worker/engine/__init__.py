"""The engine: what a worker's tasks hand prompts to and wait on.

Engines behind one seam, `engine.submit(ModelInput, max_new_tokens, GenerationOptions) -> Future`: the paged
engine (`paged/`: continuous batching over a paged KV cache, the default) and the static-batch engine
(`static_engine.py`: transformers' `generate`). `builder.build_engine` picks one for the loaded model; the request
types every engine and caller share are in `request.py`, a leaf that imports nothing of the project. The package
imports nothing of `worker/` outside itself: what it needs of the model (its EOS tokens, say) is passed in.
"""
