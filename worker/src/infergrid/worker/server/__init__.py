"""The worker's HTTP server: OpenAI + seed API, probes, Prometheus metrics (FastAPI + uvicorn over AsyncLLM)."""
