"""infergrid-router: the per-InferenceService OpenAI-compatible gateway in front of the worker pods.

    discovery (EndpointSlices or --workers) -> pool (workers, health, load) <- scraper (/metrics, /ready)
    client -> app (auth, body limit) -> holding (no ready worker) -> policy -> proxy -> worker
"""
