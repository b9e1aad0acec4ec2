"""Start-up: ready means loaded and warmed up; a model that cannot load makes the worker exit 1."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from server_harness import WorkerServer


def test_ready_means_loaded_and_warmed_up(server: WorkerServer) -> None:
    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert server.metric("infergrid:ready") == 1 and server.metric("infergrid:healthy") == 1
    assert server.metric("infergrid:engine_steps_total") >= 1  # the 1-token warm-up ran


def test_unloadable_model_exits_1_without_ever_being_ready(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    worker = WorkerServer(bad, tmp_path, name="bad-model")
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 120
    while worker.proc.poll() is None and time.monotonic() < deadline:
        for path in ("/health", "/ready"):
            try:
                seen.add((path, httpx.get(f"{worker.url}{path}", timeout=1).status_code))
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    assert worker.stop() == 1, worker.log_tail()
    assert ("/ready", 200) not in seen, seen
    assert "unsupported architectures" in worker.log_tail()
