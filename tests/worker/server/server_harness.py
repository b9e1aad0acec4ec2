"""Harness for the HTTP server tests: real `infergrid-worker serve` subprocesses on free 127.0.0.1 ports
(a module with its own name, so test files import it without depending on which conftest.py is loaded)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "sk-infergrid-test"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
READY_TIMEOUT_S = 180.0


def worker_command() -> list[str]:
    """The installed `infergrid-worker` console script (next to this Python, else on PATH)."""
    exe = Path(sys.executable).with_name("infergrid-worker")
    found = str(exe) if exe.exists() else shutil.which("infergrid-worker")
    if found is None:
        raise RuntimeError("infergrid-worker is not installed (make install)")
    return [found]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerServer:
    """One `infergrid-worker serve` subprocess."""

    def __init__(self, model_dir: Path, log_dir: Path, *, api_key: str | None = API_KEY,
                 extra_args: tuple[str, ...] = (), name: str = "worker") -> None:
        self.model_dir = model_dir
        self.api_key = api_key
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        args = ["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", MODEL_NAME, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                "--disable-uvicorn-access-log", *extra_args]
        if api_key is not None:
            args += ["--api-key", api_key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("INFERGRID_API_KEY", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*worker_command(), *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=kwargs.pop("timeout", 60.0),
                                 **kwargs)

    def log_tail(self, num_bytes: int = 6000) -> str:
        if not self._log.closed:
            self._log.flush()
        data = self.log_path.read_bytes()
        return data[-num_bytes:].decode(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics: {(sample name, sorted labels without model_name): value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        values = self.metrics()
        if key not in values:
            raise KeyError(f"{name}{labels} not exported")
        return values[key]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
