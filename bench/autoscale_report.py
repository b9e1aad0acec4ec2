"""Autoscaling report: a bounded load script against an autoscaled service on the test bed, recorded.

Starts its own test-bed control plane, the operator (standalone) and a pod runner that runs real
`infergrid-worker serve` processes (a tiny random Llama on CPU, `maxNumSeqs: 1` so queues form), applies
an autoscaled InferenceService and drives the load script below with closed-loop clients that stream
completions straight to the ready worker pods. Every second it records spec.replicas, ready replicas,
the clients' TTFT p95 over the last 10 s and every scaling Event (with its reason). Writes JSON, a
Markdown table and a PNG plot. Needs the pod network namespace:

    .venv/bin/python -m infergrid.testbed.cli exec -- .venv/bin/python bench/autoscale_report.py

The baseline is the first phase: one replica under a light load (TTFT with no queue).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.load import LoadGenerator, ready_pod_ips
from infergrid.testbed.podrunner import Backoff, PodRunner
from infergrid.testbed.procs import free_port, terminate_pid
from infergrid.testbed.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "inferenceservices.infergrid.dev.yaml"
NAME, NAMESPACE = "bench", "autoscale"
SELECTOR = f"infergrid.dev/inferenceservice={NAME},app.kubernetes.io/component=worker"
ISVC = f"/apis/infergrid.dev/v1alpha1/namespaces/{NAMESPACE}/inferenceservices/{NAME}"
# (seconds, concurrent clients)
LOAD_SCRIPT = ((20, 1), (60, 8), (40, 3), (60, 0))
AUTOSCALING = {"minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 1, "targetTTFTSeconds": 2.0,
               "scaleDownDelaySeconds": 20}


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def scale_events(cp: ControlPlane) -> list[dict[str, Any]]:
    listing = cp.client.get(f"/api/v1/namespaces/{NAMESPACE}/events",
                            fieldSelector=f"involvedObject.name={NAME},involvedObject.kind=InferenceService") or {}
    return sorted(({"time": e.get("eventTime") or e["metadata"]["creationTimestamp"], "reason": e["reason"],
                    "message": e["message"]} for e in listing.get("items", [])
                   if e["reason"] in ("ScaledUp", "ScaledDown", "ScaledToZero", "WokenUp", "OutOfBounds")),
                  key=lambda e: e["time"])


def run(cp: ControlPlane, workdir: Path, model: Path) -> dict[str, Any]:
    cp.client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    wait_for(lambda: cp.client.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default", ok_missing=True), 30,
             "the default ServiceAccount")
    runner = PodRunner(cp.kubeconfig, workdir=workdir / "pods", namespace=NAMESPACE, backoff=Backoff(0.5, 5.0),
                       probe_period_cap=1.0, max_grace=8.0, env={**os.environ, "OMP_NUM_THREADS": "1"}).start()
    log = open(workdir / "operator.log", "wb")  # noqa: SIM115 - closed below
    operator = subprocess.Popen(
        [sys.executable, "-m", "infergrid.operator.main", "--standalone", "--namespace", NAMESPACE,
         "--bind", "127.0.0.1", "--metrics-port", "0", "--health-port", str(free_port()), "--log-format", "plain"],
        env=cp.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    load = LoadGenerator(lambda: ready_pod_ips(cp.client, NAMESPACE, SELECTOR), NAME, max_concurrency=8,
                         max_tokens=32, timeout=30.0)
    timeline: list[dict[str, Any]] = []
    try:
        doc = {"apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService",
               "metadata": {"name": NAME, "namespace": NAMESPACE},
               "spec": {"model": {"source": f"file://{model}"}, "engine": {"maxNumSeqs": 1, "maxModelLen": 256},
                        "autoscaling": AUTOSCALING, "timeouts": {"startupSeconds": 120, "drainSeconds": 2}}}
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        wait_for(lambda: ((cp.client.get(ISVC) or {}).get("status") or {}).get("readyReplicas") == 1, 180,
                 "the first ready worker")
        t0 = time.monotonic()
        load.start(0)
        for seconds, clients in LOAD_SCRIPT:
            load.concurrency = clients
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                isvc = cp.client.get(ISVC) or {}
                now = time.monotonic()
                recent = [r.ttft for r in load.since(now - 10) if r.ok and r.ttft is not None]
                timeline.append({"t": round(now - t0, 1), "clients": clients,
                                 "replicas": isvc.get("spec", {}).get("replicas",
                                                                      (isvc.get("status") or {}).get("replicas")),
                                 "ready": (isvc.get("status") or {}).get("readyReplicas", 0),
                                 "ttft_p95_10s": p95(recent), "requests_10s": len(recent)})
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        load.stop()
        results = load.since(t0)
        events = scale_events(cp)
    finally:
        load.stop()
        terminate_pid(operator.pid, timeout=15, group=True, popen=operator)
        log.close()
        runner.stop()
    phases = []
    start = 0.0
    for seconds, clients in LOAD_SCRIPT:
        rows = [r for r in results if start <= r.start - t0 < start + seconds and r.ok and r.ttft is not None]
        phases.append({"from_s": start, "to_s": start + seconds, "clients": clients, "requests": len(rows),
                       "ttft_p95_s": p95([r.ttft for r in rows]),
                       "replicas_end": next((p["replicas"] for p in reversed(timeline) if p["t"] < start + seconds),
                                            None)})
        start += seconds
    failed = sum(not r.ok for r in results)
    return {"load_script": LOAD_SCRIPT, "autoscaling": AUTOSCALING, "timeline": timeline, "events": events,
            "phases": phases, "requests": len(results), "failed": failed, "t0_wall": time.time() - (
                time.monotonic() - t0), "machine": f"{os.cpu_count()} CPUs, worker on CPU (tiny random Llama)"}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| phase | clients | requests | client TTFT p95 | replicas at the end |", "|---|---|---|---|---|"]
    for p in result["phases"]:
        ttft = "-" if p["ttft_p95_s"] is None else f"{p['ttft_p95_s']:.2f} s"
        lines.append(f"| {p['from_s']:.0f}-{p['to_s']:.0f} s | {p['clients']} | {p['requests']} | {ttft} | "
                     f"{p['replicas_end']} |")
    lines += ["", "| time | decision | reason (the operator's Event) |", "|---|---|---|"]
    t0 = result["t0_wall"]
    for e in result["events"]:
        at = datetime.datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() - t0
        lines.append(f"| {at:.0f} s | {e['reason']} | {e['message']} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tl = result["timeline"]
    t = [p["t"] for p in tl]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.step(t, [p["clients"] for p in tl], where="post", label="concurrent clients (load script)", color="grey")
    top.step(t, [p["replicas"] for p in tl], where="post", label="spec.replicas (autoscaler)", color="tab:blue")
    top.step(t, [p["ready"] for p in tl], where="post", label="ready workers", color="tab:green", linestyle="--")
    top.set_ylabel("count")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"autoscaling run: {result['machine']}")
    bottom.plot(t, [p["ttft_p95_10s"] if p["ttft_p95_10s"] is not None else float("nan") for p in tl],
                color="tab:red", label="client TTFT p95 (last 10 s)")
    target = result["autoscaling"].get("targetTTFTSeconds")
    if target:
        bottom.axhline(target, color="tab:red", linestyle=":", label="targetTTFTSeconds")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("seconds since the load script started")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "autoscale_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="autoscale-bench-") as tmp, ControlPlane() as cp:
        workdir = Path(tmp)
        model = workdir / "tiny-llama"
        subprocess.run([str(Path(sys.executable).parent / "infergrid-worker"), "make-tiny-model", str(model),
                        "--arch", "llama"], check=True, capture_output=True, timeout=300)
        cp.kubectl("apply", "-f", str(CRD))
        cp.kubectl("wait", "--for=condition=Established", "crd/inferenceservices.infergrid.dev")
        result = run(cp, workdir, model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\n{result['requests']} requests, {result['failed']} failed; wrote {args.out} and its .png/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
