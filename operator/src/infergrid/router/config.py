"""The router's configuration: a frozen dataclass built once from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

POLICIES = ("prefix-aware", "least-load", "session-affinity", "round-robin")


@dataclass(frozen=True)
class RouterConfig:
    """Everything `infergrid-router` is told on its command line (validated in `__post_init__`)."""

    namespace: str | None = None
    service: str | None = None
    workers_service: str | None = None
    static_workers: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 8080
    policy: str = "prefix-aware"
    api_key_file: Path | None = None
    session_header: str = "x-session-id"
    load_factor: float = 1.25
    prefix_chunk_chars: int = 128
    prefix_max_chunks: int = 4
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_timeout: float = 600.0
    wedged_after: float = 3.0
    connect_timeout: float = 1.0
    probe_interval: float = 1.0
    probe_timeout: float = 0.8
    max_held: int = 256
    hold_timeout: float = 60.0
    retry_after_s: int = 2
    retry_budget_ratio: float = 0.2
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.static_workers and not (self.namespace and self.service):
            raise ValueError("give --namespace and --service (EndpointSlice discovery) or --workers HOST:PORT,...")
        for worker in self.static_workers:
            host, _, port = worker.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--workers entries must be HOST:PORT, got {worker!r}")
        if self.load_factor <= 1.0:
            raise ValueError(f"--load-factor must be > 1, got {self.load_factor}")
        for name in ("upstream_timeout", "wedged_after", "connect_timeout", "probe_interval", "probe_timeout",
                     "hold_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_body_bytes < 1 or self.max_held < 0:
            raise ValueError("--max-body-bytes must be >= 1 and --max-held >= 0")

    @property
    def endpoint_service(self) -> str | None:
        """The headless worker Service whose EndpointSlices are watched."""
        if self.workers_service:
            return self.workers_service
        return f"{self.service}-workers" if self.service else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infergrid-router", description="infergrid router: OpenAI-compatible "
                                "gateway with prefix-aware routing, health ejection and request holding")
    p.add_argument("--namespace", help="namespace of the InferenceService")
    p.add_argument("--service", help="the InferenceService name")
    p.add_argument("--workers-service", help="headless worker Service (default NAME-workers)")
    p.add_argument("--workers", default="", help="static workers HOST:PORT,... (no API discovery)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--policy", default="prefix-aware", choices=POLICIES)
    p.add_argument("--api-key-file", type=Path, help="one API key per line; re-read when it changes")
    p.add_argument("--session-header", default="x-session-id", help="header for session-affinity")
    p.add_argument("--load-factor", type=float, default=1.25,
                   help="bounded load: skip a worker above this x the mean in-flight load")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds to upstream response headers and between streamed chunks (a non-streamed "
                        "answer's headers come when its last token does)")
    p.add_argument("--wedged-after", type=float, default=3.0,
                   help="seconds of timed-out health probes after which a worker's in-flight requests are "
                        "aborted (504) instead of waiting out --upstream-timeout")
    p.add_argument("--connect-timeout", type=float, default=1.0)
    p.add_argument("--probe-interval", type=float, default=1.0, help="seconds between /metrics + /ready probes")
    p.add_argument("--probe-timeout", type=float, default=0.8)
    p.add_argument("--max-held", type=int, default=256, help="requests held while no worker is ready")
    p.add_argument("--hold-timeout", type=float, default=60.0, help="seconds a request is held at most")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def parse_config(argv: list[str] | None = None) -> RouterConfig:
    """Parse the command line; a bad combination exits with argparse's error naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return RouterConfig(
            namespace=args.namespace, service=args.service, workers_service=args.workers_service,
            static_workers=tuple(w.strip() for w in args.workers.split(",") if w.strip()),
            host=args.host, port=args.port, policy=args.policy, api_key_file=args.api_key_file,
            session_header=args.session_header.lower(), load_factor=args.load_factor,
            max_body_bytes=args.max_body_bytes, upstream_timeout=args.upstream_timeout, wedged_after=args.wedged_after,
            connect_timeout=args.connect_timeout, probe_interval=args.probe_interval,
            probe_timeout=args.probe_timeout, max_held=args.max_held, hold_timeout=args.hold_timeout,
            log_level=args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
