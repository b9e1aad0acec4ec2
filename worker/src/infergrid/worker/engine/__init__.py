"""The engine: Scheduler -> KVCacheManager -> BlockPool (pure Python), ModelRunner, LLMEngine, AsyncLLM."""
