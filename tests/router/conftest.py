"""Fixtures for the router tests: one tiny checkpoint per session, and a factory for real workers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from router_harness import BIN, Worker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("router-model") / "tiny-llama"
    subprocess.run([str(BIN / "infergrid-worker"), "make-tiny-model", str(out), "--arch", "llama"], check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router-logs")


@pytest.fixture(scope="session")
def start_workers(tiny_model_dir: Path, log_dir: Path) -> Iterator[Callable[..., list[Worker]]]:
    """Factory: start n workers in parallel and wait until all are ready; all stopped at session end."""
    started: list[Worker] = []

    def start(n: int, *extra: str, wait: bool = True) -> list[Worker]:
        workers = [Worker(tiny_model_dir, log_dir, None, *extra) for _ in range(n)]
        started.extend(workers)
        if wait:
            for w in workers:
                w.wait_ready()
        return workers

    yield start
    for w in started:
        w.stop()
