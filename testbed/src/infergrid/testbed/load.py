"""A bounded, closed-loop load against the ready worker pods of one InferenceService (no router needed).

`concurrency` threads each send one streaming completion after another, round robin over the pods that
are Ready right now (re-listed every half second), and record every request's time to first token.
Cheap on CPU: the threads mostly wait on sockets. Must run inside the pod network namespace.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable

import httpx

from infergrid.testbed.kubeapi import KubeClient


@dataclasses.dataclass(frozen=True)
class Result:
    """One request: when it started and ended (monotonic seconds), its TTFT, the pod IP, the outcome."""

    start: float
    end: float
    ttft: float | None
    ip: str
    ok: bool
    error: str = ""


def ready_pod_ips(client: KubeClient, namespace: str, selector: str) -> list[str]:
    """IPs of the pods matching `selector` that are Ready and not terminating."""
    listing = client.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector) or {}
    ips = []
    for pod in listing.get("items", []):
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
            ips.append(status["podIP"])
    return sorted(ips)


class LoadGenerator:
    """Closed-loop load; `concurrency` may change while it runs (threads above it idle)."""

    def __init__(self, targets: Callable[[], list[str]], model: str, *, max_concurrency: int, max_tokens: int,
                 prompt: str = "Count slowly from one to a hundred:", timeout: float = 30.0) -> None:
        self.targets_fn, self.model, self.max_tokens, self.prompt = targets, model, max_tokens, prompt
        self.timeout = timeout
        self.concurrency = 0
        self.results: list[Result] = []
        self._targets: list[str] = []
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True, name=f"load-{i}")
                         for i in range(max_concurrency)]
        self._threads.append(threading.Thread(target=self._refresh, daemon=True, name="load-targets"))

    def start(self, concurrency: int) -> LoadGenerator:
        self.concurrency = concurrency
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def since(self, t0: float) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.start >= t0]

    def refresh_targets(self) -> None:
        """Ask `targets` now (it is also asked every 0.5 s): requests sent from here on go to its answer."""
        self._targets = self.targets_fn()

    def _refresh(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_targets()
            except Exception:  # noqa: BLE001 - an API hiccup: keep the last list
                pass
            self._stop.wait(0.5)

    def _client(self, index: int) -> None:
        with httpx.Client(trust_env=False, timeout=self.timeout) as client:
            while not self._stop.is_set():
                targets = self._targets
                if index >= self.concurrency or not targets:
                    self._stop.wait(0.2)
                    continue
                ip = targets[next(self._counter) % len(targets)]
                result = self._one(client, ip)
                with self._lock:
                    self.results.append(result)
                if not result.ok:
                    self._stop.wait(0.2)

    def _one(self, client: httpx.Client, ip: str) -> Result:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        start = time.monotonic()
        ttft = None
        try:
            with client.stream("POST", f"http://{ip}:8000/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    return Result(start, time.monotonic(), None, ip, False, f"HTTP {response.status_code}")
                for line in response.iter_lines():
                    if ttft is None and line.startswith("data:"):
                        ttft = time.monotonic() - start
                    if line.strip() == "data: [DONE]":
                        break
        except httpx.HTTPError as exc:
            return Result(start, time.monotonic(), ttft, ip, False, type(exc).__name__)
        return Result(start, time.monotonic(), ttft, ip, True)


class EndpointLoad:
    """`concurrency` threads posting `body` to one URL (a router, a ClusterIP) one request after another
    until the `with` block ends; `results` holds (start, end, HTTP status or 0, response text or error)."""

    def __init__(self, url: str, body: dict, concurrency: int = 4) -> None:
        self.url, self.body = url, body
        self.results: list[tuple[float, float, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def _run(self) -> None:
        with httpx.Client(timeout=60, trust_env=False) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(self.url, json=self.body)
                    status, text = r.status_code, r.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                self.results.append((t0, time.monotonic(), status, text))

    def __enter__(self) -> EndpointLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def tenant_system_prompts(salt: str, num_requests: int = 200, num_tenants: int = 7,
                          unique_fraction: float = 0.2, seed: int = 7) -> list[str]:
    """System prompts for a multi-tenant prefix-cache workload: `1 - unique_fraction` of the requests
    cycle through `num_tenants` tenants' prompts (~200 tokens each with a byte-level tokenizer), the
    rest are unique. With a KV pool that holds only a few tenants' prefixes per worker, prefix-aware
    routing keeps each tenant on its worker and round-robin shows every worker every tenant in turn
    (the LRU pool's worst case). `salt` makes the prompts of one run unlike another's."""
    rng = random.Random(seed)
    tenants = [f"[{salt}-{t}] " + f"You are assistant {t} of the {salt} team. Follow rule {t}. " * 5
               for t in range(num_tenants)]
    prompts: list[str] = []
    for _ in range(num_requests):
        unique = rng.random() < unique_fraction
        prompts.append(f"[{uuid.UUID(int=rng.getrandbits(128))}] unique " * 3 if unique
                       else tenants[len(prompts) % num_tenants])
    return prompts
