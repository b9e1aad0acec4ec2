"""A byte relay between a TCP port and a unix socket, used to reach the API server across namespaces.

Unix sockets with a path are not network-namespaced, so ``host 127.0.0.1:P -> unix socket ->
127.0.0.1:P inside the pod netns`` lets tools on the host talk to an API server that listens only
inside the namespace (TLS passes through untouched, so the same kubeconfig works on both sides).

    python -m infergrid.testbed.forward --listen tcp:127.0.0.1:6443 --connect unix:/tmp/x/api.sock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
from pathlib import Path


def parse_endpoint(spec: str) -> tuple[str, str | int, int | None]:
    """'tcp:HOST:PORT' or 'unix:PATH' -> ('tcp', host, port) / ('unix', path, None)."""
    kind, _, rest = spec.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return "tcp", host, int(port)
    if kind == "unix":
        return "unix", rest, None
    raise ValueError(f"endpoint must be tcp:HOST:PORT or unix:PATH, not {spec!r}")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _open(ep: tuple[str, str | int, int | None]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if ep[0] == "tcp":
        return await asyncio.open_connection(ep[1], ep[2])
    return await asyncio.open_unix_connection(str(ep[1]))


async def serve(listen: str, connect: str, started: threading.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Accept on `listen` and relay each connection to `connect` until `stop` is set (or forever)."""
    src, dst = parse_endpoint(listen), parse_endpoint(connect)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await _open(dst)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, w2), _pipe(r2, w))

    if src[0] == "tcp":
        server = await asyncio.start_server(handle, src[1], src[2], reuse_address=True)
    else:
        Path(str(src[1])).unlink(missing_ok=True)
        server = await asyncio.start_unix_server(handle, str(src[1]))
    if started is not None:
        started.set()
    async with server:
        if stop is None:
            await server.serve_forever()
        else:
            await stop.wait()


class RelayThread(threading.Thread):
    """Runs :func:`serve` on its own event loop in a daemon thread; :meth:`close` stops it."""

    def __init__(self, listen: str, connect: str):
        super().__init__(name=f"relay {listen}->{connect}", daemon=True)
        self.listen, self.connect = listen, connect
        self.started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(self.listen, self.connect, self.started, self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as e:  # noqa: BLE001 - surfaced through .error
            self.error = e
            self.started.set()

    def close(self) -> None:
        """Stop accepting and end the thread."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.join(5)


def main(argv: list[str] | None = None) -> int:
    """Command line: relay until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(prog="infergrid.testbed.forward")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--connect", required=True)
    args = ap.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.listen, args.connect, stop=stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
