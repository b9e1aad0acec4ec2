"""A stand-in worker for bench_router.py's `--stub-workers` rows: answers the OpenAI completion a tiny
worker would (fixed JSON), plus /ready, /metrics and /v1/models, with next to no CPU, so the router's
own cost is what the latency columns show.

    python bench/stub_worker.py PORT
"""

from __future__ import annotations

import asyncio
import sys

_COMPLETION = (b'{"id":"cmpl-stub","object":"text_completion","created":0,"model":"stub","choices":[{"index":0,'
               b'"text":" x","finish_reason":"length","logprobs":null}],"usage":{"prompt_tokens":3,'
               b'"completion_tokens":1,"total_tokens":4}}')
_MODELS = b'{"object":"list","data":[{"id":"stub","object":"model","created":0,"owned_by":"bench"}]}'
_METRICS = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n"


def _answer(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncontent-length: %d\r\n\r\n%b" % (content_type, len(body), body)


_ROUTES = {b"/ready": _answer(b'{"status":"ready"}'), b"/metrics": _answer(_METRICS, b"text/plain"),
           b"/v1/models": _answer(_MODELS), b"/health": _answer(b"ok", b"text/plain")}


class StubWorker(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            path = head.split(b" ", 2)[1].split(b"?", 1)[0]
            self.transport.write(_ROUTES.get(path) or _answer(_COMPLETION))  # type: ignore[attr-defined]


async def main(port: int) -> None:
    await asyncio.get_running_loop().create_server(StubWorker, "127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
