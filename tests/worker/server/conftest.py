"""Fixtures for the HTTP server tests: a tiny random checkpoint made with `infergrid-worker
make-tiny-model`, and real `infergrid-worker serve` subprocesses (see server_harness.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_harness import API_KEY, WorkerServer, worker_command


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with tokenizer and chat template."""
    out = tmp_path_factory.mktemp("server-model") / "tiny-llama"
    subprocess.run([*worker_command(), "make-tiny-model", str(out), "--arch", "llama"], check=True,
                   capture_output=True, timeout=300)
    assert (out / "config.json").is_file()
    return out


@pytest.fixture(scope="session")
def start_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        Callable[..., WorkerServer]]:
    """Factory: start a worker with extra CLI args and wait for /ready; all are stopped at the end."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[WorkerServer] = []

    def start(*extra_args: str, api_key: str | None = API_KEY, name: str = "worker",
              wait: bool = True) -> WorkerServer:
        server = WorkerServer(tiny_model_dir, log_dir, api_key=api_key, extra_args=extra_args, name=name)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop(timeout=30)


@pytest.fixture(scope="session")
def server(start_worker: Callable[..., WorkerServer]) -> WorkerServer:
    """The shared worker: API key on, queue of 64, a KV pool with room for every test's requests."""
    return start_worker("--max-queue-size", "64", "--num-gpu-blocks-override", "600", "--max-num-seqs", "32",
                        name="main")


@pytest.fixture(scope="session")
def small_server(start_worker: Callable[..., WorkerServer]) -> WorkerServer:
    """A worker with a queue of 4 and a 24-block KV pool (admission and preemption tests)."""
    return start_worker("--max-queue-size", "4", "--num-gpu-blocks-override", "24", "--max-num-seqs", "8",
                        name="small")
