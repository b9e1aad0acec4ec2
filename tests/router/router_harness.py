"""Harness for the router's process-level tests: real `infergrid-worker serve` and `infergrid-router`
subprocesses on free 127.0.0.1 ports (a module with its own name, imported by the test files)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
MODEL_NAME = "tiny-llama"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess in its own session, logging to a file; stop() kills its group."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def log_tail(self, num_bytes: int = 4000) -> str:
        return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")


class Worker(Proc):
    def __init__(self, model_dir: Path, log_dir: Path, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        super().__init__([str(BIN / "infergrid-worker"), "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                          "--port", str(self.port), "--served-model-name", MODEL_NAME, "--device", "cpu",
                          "--dtype", "float32", "--max-model-len", "1024", "--disable-uvicorn-access-log", *extra],
                         log_dir / f"worker-{self.port}.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        wait_until(lambda: _get_ok(self.url + "/ready"), timeout, f"worker {self.port} ready", self)

    def counter(self, name: str) -> float:
        """Sum of a counter's samples in the worker's /metrics (e.g. vllm:prefix_cache_hits_total)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


class Router(Proc):
    def __init__(self, log_dir: Path, workers: list[str], *extra: str, name: str = "router") -> None:
        self.port = free_port()
        super().__init__([str(BIN / "infergrid-router"), "--workers", ",".join(workers), "--host", "127.0.0.1",
                          "--port", str(self.port), *extra], log_dir / f"{name}-{self.port}.log")
        wait_until(lambda: _get_ok(self.url + "/ready"), 30, "router ready", self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def wait_ready_workers(self, count: int, timeout: float = 60.0) -> float:
        """Seconds until infergrid:router_ready_workers == count."""
        t0 = time.monotonic()
        wait_until(lambda: self.metric("infergrid:router_ready_workers") == count, timeout,
                   f"{count} ready workers", self, interval=0.05)
        return time.monotonic() - t0


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, timeout: float, what: str, proc: Proc | None = None, interval: float = 0.2) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited {proc.proc.returncode}\n{proc.log_tail()}")
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout} s\n{proc.log_tail() if proc else ''}")
