"""Probes every worker about once a second: `GET /metrics` (waiting, running, KV usage) and `GET /ready`.
A refused connection, a timeout, a non-200 `/ready` or a failed scrape ejects the worker (health.py);
a good probe re-admits it."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from infergrid.router.health import Failure
from infergrid.router.pool import Worker, WorkerPool

log = logging.getLogger(__name__)

_GAUGES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


def parse_load(text: str) -> dict[str, float]:
    """Sum of each load gauge over its label sets (one model per worker; summing is safe either way)."""
    out = {"waiting": 0.0, "running": 0.0, "kv_usage": 0.0}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value = line.partition(" ")
        else:
            value = rest.rpartition("} ")[2]
        field = _GAUGES.get(name.strip())
        if field is not None:
            try:
                out[field] += float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return out


class Scraper:
    """One probe loop per worker, started when discovery adds it and ended when it leaves."""

    def __init__(self, pool: WorkerPool, interval: float, timeout: float) -> None:
        self.pool = pool
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[Worker, asyncio.Task[None]] = {}  # by identity: an old one may still run

    def start(self, worker: Worker) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0), timeout=self.timeout)
        self._tasks[worker] = asyncio.get_running_loop().create_task(self._loop(worker))

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def probe(self, worker: Worker) -> Failure | None:
        """One probe; returns the failure, or None after updating the worker's load."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self.timeout.total):
                async with self._session.get(worker.base_url + "/ready") as ready:
                    await ready.read()
                    if ready.status != 200:
                        return Failure.NOT_READY
                async with self._session.get(worker.base_url + "/metrics") as metrics:
                    if metrics.status != 200:
                        return Failure.SCRAPE
                    load = parse_load(await metrics.text())
        except aiohttp.ClientConnectorError:
            return Failure.CONNECT
        except TimeoutError:
            return Failure.TIMEOUT
        except aiohttp.ClientError:
            return Failure.SCRAPE
        worker.waiting, worker.running = int(load["waiting"]), int(load["running"])
        worker.queue_load = worker.waiting + worker.running
        worker.kv_usage = load["kv_usage"]
        return None

    async def _loop(self, worker: Worker) -> None:
        """Probe while the worker is a member, and after discovery dropped it for as long as requests are
        still in flight on it: a wedged pod goes NotReady and leaves the EndpointSlice, and its in-flight
        requests must still be aborted once it has been silent for --wedged-after (pool.py)."""
        pool = self.pool
        while pool.workers.get(worker.name) is worker or worker.in_flight > 0:
            started = time.monotonic()
            failure = await self.probe(worker)
            if pool.workers.get(worker.name) is not worker and worker.in_flight == 0:
                break
            if failure is None:
                pool.report_ok(worker)
            else:
                pool.report_failure(worker, failure)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        del self._tasks[worker]
