"""The pipeline's stages, each a plain function of the worker's context (`worker.service.runtime.Runtime`: store,
engine, tokenizer, settings) and the job it works on. `worker.service.tasks` runs them inside
`worker.service.middleware`, which owns claims, leases and the mapping of failures to reason codes.

extraction:  a document's pages (text layer, OCR, page images), stored once; a long one split in chunks
prompting:   a claimed job as the model's request (prompt, decoding settings, answer schema)
answering:   the engine's answer, decoded under the schema, validated, checked and stored
reducing:    a long document's chunk answers merged by the schema, or handed to the model
"""
