"""The engine: LLMEngine, AsyncLLM and the core: Scheduler -> KVCacheManager -> BlockPool (pure Python; the
ModelRunner is in runner/, the executors in distributed/)."""
