"""The router's HTTP application: own endpoints (`/health`, `/ready`, `/metrics`) and the proxy path
(auth -> body limit -> hold while no worker is ready -> policy -> forward, retrying connect failures)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Iterable

from infergrid.router.auth import KeyFile
from infergrid.router.config import RouterConfig
from infergrid.router.errors import error_response
from infergrid.router.holding import HoldingQueue, HoldRejected
from infergrid.router.http_server import Request, Response, Stream
from infergrid.router.metrics import RouterMetrics
from infergrid.router.policies import make_policy, prefix_key_from_body, session_key
from infergrid.router.pool import Worker, WorkerPool
from infergrid.router.proxy import ConnectFailed, Proxy, UpstreamResult
from infergrid.router.retry_budget import RetryBudget
from infergrid.router.scraper import Scraper

log = logging.getLogger(__name__)
_OWN_METHODS = ("GET", "HEAD")
_TEXT = "text/plain; charset=utf-8"


def request_ids() -> Iterable[str]:
    """Ids for requests that came without X-Request-Id: 32 hex digits, a random per-process prefix and a
    counter (unique across routers without paying for a uuid4 per request)."""
    prefix = os.urandom(8).hex()
    return (f"{prefix}{n:016x}" for n in itertools.count())


class Router:
    """State shared by the request handlers: the pool, the policy, holding, auth, metrics."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics(config.policy)
        self.pool = WorkerPool()
        self.policy = make_policy(config.policy, config.load_factor)
        self.holding = HoldingQueue(config.max_held, config.hold_timeout, on_change=self.metrics.held.set)
        self.keys = KeyFile(config.api_key_file) if config.api_key_file else None
        self.proxy = Proxy(config.upstream_timeout, config.connect_timeout, strip_authorization=self.keys is not None)
        self.scraper = Scraper(self.pool, config.probe_interval, config.probe_timeout)
        self.retry_budget = RetryBudget(config.retry_budget_ratio)
        self.is_synced = False  # discovery's first view arrived (/ready)
        self.pool.on_member_added = self._on_member_added
        self.pool.on_member_removed = lambda w: self.metrics.remove_worker(w.name)
        self.pool.on_eject = lambda w, f: self.metrics.ejections.labels(w.name, f.value).inc()
        self.pool.on_wedged = self._abort_in_flight
        self.pool.wedged_after = config.wedged_after
        self.pool.add_listener(self._on_pool_change)
        self._needs_body_key = config.policy == "prefix-aware"
        self._session_header = config.session_header if config.policy == "session-affinity" else None
        self._request_ids = iter(request_ids())
        self._own = {"/health": self.health, "/ready": self.ready, "/metrics": self.render_metrics}

    def _on_member_added(self, worker: Worker) -> None:
        self.metrics.add_worker(worker.name)
        self.scraper.start(worker)

    def _abort_in_flight(self, worker: Worker) -> None:
        """A wedged worker (stopped, sockets open): end its in-flight requests now with a clear error."""
        self.proxy.pool.abort_busy(worker.host, worker.port, (
            f"the worker {worker.name} answered nothing for {self.config.wedged_after:g} s (its health probes "
            "timed out); the request was aborted"))

    def _on_pool_change(self) -> None:
        self.metrics.ready_workers.set(len(self.pool.ready))
        if self.pool.ready:
            self.holding.release_all()

    def set_workers(self, names: Iterable[str]) -> None:
        self.pool.set_members(names)
        self.is_synced = True

    async def dispatch(self, request: Request, stream: Stream) -> Response | None:
        """GET/HEAD of the router's own paths answer here; everything else goes to a worker."""
        if request.method in _OWN_METHODS and (own := self._own.get(request.path)) is not None:
            return own()
        return await self.handle(request, stream)

    # ---------------------------------------------------------------------------------- own endpoints
    def health(self) -> Response:
        return Response(200, b"ok", content_type=_TEXT)

    def ready(self) -> Response:
        """Ready once discovery has answered: with zero workers the router still holds requests."""
        if self.is_synced:
            return Response(200, b"ok", content_type=_TEXT)
        return Response(503, b"waiting for worker discovery", content_type=_TEXT)

    def render_metrics(self) -> Response:
        return Response(200, self.metrics.render(), content_type=_TEXT)

    # ---------------------------------------------------------------------------------- proxy path
    async def handle(self, request: Request, stream: Stream) -> Response | None:
        """Every path other than the router's own: authenticate, pick a worker, forward."""
        headers = request.headers
        request_id = headers.get("x-request-id") or next(self._request_ids)
        if self.keys is not None and not self.keys.check(headers.get("authorization")):
            self.metrics.count_request("", "unauthorized")
            return error_response(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                                  "invalid_api_key", request_id=request_id)
        if request.too_large:
            return self._too_large(request_id)
        body = request.body
        key: int | None = None
        if self._needs_body_key and body:
            key = prefix_key_from_body(body, self.config.prefix_chunk_chars, self.config.prefix_max_chunks)
        elif self._session_header is not None and (value := headers.get(self._session_header)):
            key = session_key(value)
        self.retry_budget.on_request()
        return await self._route(request, stream, key, request_id)

    def _too_large(self, request_id: str) -> Response:
        self.metrics.count_request("", "too_large")
        return error_response(413, f"request body exceeds {self.config.max_body_bytes} bytes",
                              "request_too_large", request_id=request_id)

    async def _route(self, request: Request, stream: Stream, key: int | None, request_id: str) -> Response | None:
        tried: set[str] = set()
        while True:
            candidates = self.pool.ready
            if tried:
                candidates = [w for w in candidates if w.name not in tried]
            if not candidates:
                if tried and self.pool.ready:
                    break  # every ready worker refused; do not loop
                try:
                    await self.holding.wait()
                except HoldRejected as exc:
                    return self._reject_held(exc.reason, request_id)
                continue
            worker: Worker = self.policy.choose(candidates, key)  # type: ignore[assignment]
            result: list[UpstreamResult] = []
            worker.in_flight += 1
            try:
                response = await self.proxy.forward(request, stream, worker, request_id, result)
            except ConnectFailed as exc:
                self.pool.report_failure(worker, exc.failure)
                self.metrics.count_request(worker.name, "connect_error")
                tried.add(worker.name)
                if not self.retry_budget.try_withdraw():
                    return error_response(502, f"could not connect to a worker ({exc}); retry budget spent",
                                          "upstream_unreachable", request_id=request_id)
                self.metrics.retries.inc()
                continue
            except asyncio.CancelledError:
                self.metrics.count_request(worker.name, "client_disconnect")
                raise
            finally:
                worker.in_flight -= 1
            outcome = result[0] if result else UpstreamResult("unknown")
            if outcome.failure is not None:
                self.pool.report_failure(worker, outcome.failure)
            if outcome.headers_s is not None:
                self.metrics.upstream_latency.observe(outcome.headers_s)
            self.metrics.count_request(worker.name, outcome.outcome)
            return response
        return error_response(502, "could not connect to any ready worker", "upstream_unreachable",
                              request_id=request_id)

    def _reject_held(self, reason: str, request_id: str) -> Response:
        self.metrics.count_request("", f"held_{reason}")
        if reason == "full":
            message = f"no worker is ready and {self.config.max_held} requests are already waiting"
        else:
            message = f"no worker became ready within {self.config.hold_timeout:g} s"
        return error_response(503, message, "no_ready_worker", request_id=request_id,
                              retry_after=self.config.retry_after_s)

    async def close(self) -> None:
        await self.scraper.close()
        await self.proxy.close()
