"""Router overhead benchmark: direct-to-worker vs through infergrid-router vs through vllm-router (PyPI,
the Rust peer), same workers, same run, interleaved repeats.

Starts N real tiny CPU workers on loopback (`infergrid-worker make-tiny-model` + `serve`), then per repeat:
sequential small requests (max_tokens 1) interleaved request by request over the targets for the latency
distributions (each target sees the same background load), then per target in turn 16 concurrent
clients for a fixed time for req/s at saturation (and the router process's CPU time per request). Added latency = the target's p50/p99
minus the direct p50/p99 of the same repeat. Prints a table (medians over repeats, [min..max]) and
writes JSON with the commit, the exact command and the machine.

    .venv/bin/python -m pip install vllm-router        # the peer (into .venv only; not a dependency)
    .venv/bin/python bench/bench_router.py [--workers 2] [--repeats 3] [--out bench/results/router.json]

Without vllm-router installed its rows are skipped (and say so). `--stub-workers` puts stand-in workers
(bench/stub_worker.py: a fixed completion, no model, next to no CPU) behind every target instead, so the
columns show the routers' own cost without the tiny model's CPU competing on this small machine. `--baseline REV` adds rows for the router
package as of git revision REV (extracted to the scratch directory and run from there), to compare an
optimisation with what it replaces in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], check_body: str | None = None) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a live process (its threads included), seconds; 0 without a pid."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_request(session: aiohttp.ClientSession, url: str, n: int) -> float:
    body = {"prompt": f"Hello {n % 97}", "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
    return time.perf_counter() - t0


async def measure_latency(targets: dict[str, list[str]], num_requests: int) -> dict[str, dict[str, float]]:
    """Sequential small requests, interleaved request by request over the targets (so each target sees the
    same background load on this shared machine); the direct target round-robins over the workers."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for i in range(num_requests + 20):
            for name, urls in targets.items():
                latency = await one_request(session, urls[i % len(urls)], i)
                if i >= 20:  # the first ones warm the pools
                    samples[name].append(latency)
    return {name: {"p50_ms": percentile(v, 0.5) * 1e3, "p99_ms": percentile(v, 0.99) * 1e3}
            for name, v in samples.items()}


async def measure_throughput(urls: list[str], concurrency: int, seconds: float,
                             pid: int | None = None) -> dict[str, float]:
    """req/s with `concurrency` clients for `seconds`, and the router process's CPU time per request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        counter = done = 0
        for _ in range(concurrency):
            counter += 1
            await one_request(session, urls[counter % len(urls)], counter)
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal counter, done
            while time.perf_counter() < deadline:
                counter += 1
                await one_request(session, urls[counter % len(urls)], counter)
                done += 1

        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"rps": done / elapsed, "cpu_ms_per_request": cpu / max(done, 1) * 1e3}


def baseline_router(rev: str, where: Path) -> list[str]:
    """A command running the `infergrid.router` package as of git revision `rev` (the rest of infergrid
    from this checkout): the old package is extracted to `where` and imported in place of the current one."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "operator/src/infergrid/router"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    package = where / "operator/src/infergrid/router"
    launcher = ("import importlib.util, sys; "
                f"spec = importlib.util.spec_from_file_location('infergrid.router', {str(package / '__init__.py')!r}, "
                f"submodule_search_locations=[{str(package)!r}]); "
                "module = importlib.util.module_from_spec(spec); sys.modules['infergrid.router'] = module; "
                "spec.loader.exec_module(module); "
                "from infergrid.router.main import main; sys.argv[0] = 'infergrid-router'; main()")
    return [sys.executable, "-c", launcher]


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "num_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per latency sample")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="saturation phase length")
    ap.add_argument("--baseline", metavar="REV", help="also run infergrid-router as of this git revision")
    ap.add_argument("--stub-workers", action="store_true",
                    help="stand-in workers (bench/stub_worker.py) instead of tiny model workers")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "router.json")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-router-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        model = scratch / "model"
        if not args.stub_workers:
            subprocess.run([str(BIN / "infergrid-worker"), "make-tiny-model", str(model), "--arch", "llama"],
                           check=True, capture_output=True)
        worker_urls = []
        for i in range(args.workers):
            port = free_port()
            command = [sys.executable, str(REPO / "bench" / "stub_worker.py"), str(port)] if args.stub_workers else [
                str(BIN / "infergrid-worker"), "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
                str(port), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
                "--disable-uvicorn-access-log", "--log-level", "warning"]
            procs.append(start(command, scratch / f"worker{i}.log"))
            worker_urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(worker_urls, procs, strict=True):
            wait_http(url + "/ready", 300, proc)

        targets: dict[str, list[str]] = {"direct": worker_urls}
        logs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        hostports = ",".join(u.removeprefix("http://") for u in worker_urls)
        routers = {"infergrid-router": [str(BIN / "infergrid-router")]}
        if args.baseline:
            routers[f"infergrid-router@{args.baseline}"] = baseline_router(args.baseline, scratch / "baseline")
        for label, command in routers.items():
            for policy in ("round-robin", "prefix-aware"):
                port = free_port()
                log = scratch / f"{label}-{policy}.log".replace("/", "_")
                proc = start([*command, "--workers", hostports, "--host", "127.0.0.1", "--port",
                              str(port), "--policy", policy, "--log-level", "warning"], log)
                procs.append(proc)
                targets[f"{label} {policy}"] = [f"http://127.0.0.1:{port}"]
                logs[f"{label} {policy}"] = (proc, log)
        vllm_router = shutil.which("vllm-router", path=str(BIN)) or shutil.which("vllm-router")
        if vllm_router:
            for policy in ("round_robin", "cache_aware"):
                port = free_port()
                log = scratch / f"vllm-router-{policy}.log"
                proc = start([vllm_router, "--worker-urls", *worker_urls, "--host", "127.0.0.1", "--port", str(port),
                              "--policy", policy, "--log-level", "warning", "--prometheus-port", str(free_port())],
                             log)
                procs.append(proc)
                targets[f"vllm-router {policy}"] = [f"http://127.0.0.1:{port}"]
                logs[f"vllm-router {policy}"] = (proc, log)
        else:
            print("vllm-router not installed: its rows are skipped (.venv/bin/python -m pip install vllm-router)")
        for name, (proc, log) in logs.items():
            try:
                wait_http(targets[name][0] + "/v1/models", 120, proc)
            except (RuntimeError, TimeoutError):
                print(log.read_text(errors="replace")[-3000:])
                raise
        time.sleep(2.0)  # first probes

        samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for rep in range(args.repeats):
            latency = asyncio.run(measure_latency(targets, args.requests))
            for name, urls in targets.items():
                pid = logs[name][0].pid if name in logs else None
                result = {**latency[name], **asyncio.run(measure_throughput(urls, args.concurrency, args.seconds, pid))}
                samples[name].append(result)
                print(f"repeat {rep + 1}/{args.repeats} {name:40s} p50 {result['p50_ms']:.2f} ms  "
                      f"p99 {result['p99_ms']:.2f} ms  {result['rps']:.0f} req/s  "
                      f"{result['cpu_ms_per_request']:.3f} CPU ms/req", flush=True)

        rows = summarize(samples, args.repeats)
        print_table(rows, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
        args.out.write_text(json.dumps({
            "commit": commit, "dirty": dirty, "command": " ".join([sys.executable, *sys.argv]),
            "machine": machine(), "workers": args.workers, "stub_workers": args.stub_workers, "concurrency": args.concurrency,
            "requests": args.requests, "seconds": args.seconds, "repeats": args.repeats,
            "rows": rows, "samples": samples}, indent=2))
        print(f"wrote {args.out}")
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(scratch, ignore_errors=True)


def summarize(samples: dict[str, list[dict[str, float]]], repeats: int) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    direct = samples["direct"]
    for name, runs in samples.items():
        added50 = [r["p50_ms"] - d["p50_ms"] for r, d in zip(runs, direct, strict=True)]
        added99 = [r["p99_ms"] - d["p99_ms"] for r, d in zip(runs, direct, strict=True)]
        share = [r["rps"] / d["rps"] for r, d in zip(runs, direct, strict=True)]

        def stat(values: list[float]) -> dict[str, float]:
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}

        rows[name] = {"p50_ms": stat([r["p50_ms"] for r in runs]), "p99_ms": stat([r["p99_ms"] for r in runs]),
                      "added_p50_ms": stat(added50), "added_p99_ms": stat(added99),
                      "rps": stat([r["rps"] for r in runs]), "rps_vs_direct": stat(share),
                      "cpu_ms_per_request": stat([r["cpu_ms_per_request"] for r in runs])}
    return rows


def print_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    def fmt(s: dict[str, float], digits: int = 2, pct: bool = False) -> str:
        if pct:
            return f"{s['median'] * 100:.0f}% [{s['min'] * 100:.0f}..{s['max'] * 100:.0f}]"
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"

    kind = "stand-in (stub_worker.py)" if args.stub_workers else "tiny CPU"
    print(f"\n{args.workers} {kind} workers, max_tokens 1; medians over {args.repeats} interleaved repeats "
          f"[min..max]; req/s with {args.concurrency} concurrent clients for {args.seconds:g} s")
    header = f"| {'target':38s} | {'p50 ms':18s} | {'added p50 ms':20s} | {'added p99 ms':20s} | " \
             f"{'req/s':18s} | {'vs direct':16s} | {'router CPU ms/req':20s} |"
    print(header)
    print("|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|")
    for name, row in rows.items():
        print(f"| {name:38s} | {fmt(row['p50_ms']):18s} | {fmt(row['added_p50_ms']):20s} | "
              f"{fmt(row['added_p99_ms']):20s} | {fmt(row['rps'], 0):18s} | {fmt(row['rps_vs_direct'], pct=True):16s} | "
              f"{fmt(row['cpu_ms_per_request'], 3):20s} |")


if __name__ == "__main__":
    main()
