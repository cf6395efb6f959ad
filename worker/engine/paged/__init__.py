"""docbatch's own paged engine: scheduler, block manager, KV cache, runner, sampler (nano-vllm's shape)."""
