"""The HTTP API: OpenAI's Files and Batches endpoints over docbatch (`docbatch api`; see docs/API.md)."""
