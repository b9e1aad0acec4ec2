"""`infergrid-router`: run one router (see config.py for the flags)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from infergrid.router.app import Router
from infergrid.router.config import RouterConfig, parse_config
from infergrid.router.http_server import HttpServer

log = logging.getLogger("infergrid.router")
_DRAIN_S = 50.0  # in-flight requests get this long after SIGTERM (grace: builders/router.py, 60 s with preStop)


async def serve(config: RouterConfig, started: asyncio.Event | None = None) -> None:
    """Serve until cancelled or SIGTERM/SIGINT."""
    router = Router(config)
    server = HttpServer(router.dispatch, config.max_body_bytes)
    await server.start(config.host, config.port)
    tasks: list[asyncio.Task[None]] = []
    kube = None
    if config.static_workers:
        router.set_workers(config.static_workers)
    else:
        from infergrid.operator.kube import KubeClient
        from infergrid.router.discovery import EndpointSliceDiscovery

        kube = KubeClient.from_environment()
        assert config.namespace and config.endpoint_service
        discovery = EndpointSliceDiscovery(kube, config.namespace, config.endpoint_service, router.set_workers)
        tasks.append(asyncio.get_running_loop().create_task(discovery.run()))
    log.info("infergrid-router listening on %s:%d, policy %s, %s", config.host, config.port, config.policy,
             f"workers {','.join(config.static_workers)}" if config.static_workers
             else f"EndpointSlices of {config.namespace}/{config.endpoint_service}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.shutdown(_DRAIN_S)
        await router.close()
        if kube is not None:
            await kube.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(serve(config))
    else:
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
