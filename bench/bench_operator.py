"""Operator scale benchmark: N InferenceServices created at once -> all children reconciled.

Starts its own test-bed control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK fake
GPU nodes), installs the CRD, starts `infergrid-operator` as a subprocess, creates N InferenceServices
concurrently and waits until every one has its five children and a status whose observedGeneration
matches (the operator sets it only once the worker Deployment carries the current spec hash).

    .venv/bin/python bench/bench_operator.py --services 1000 [--replicas 1] [--out out.json]

Prints a table and writes JSON. The baseline row is the same run's time to merely create the N
InferenceServices (the API server's own floor for this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from infergrid.operator import constants as c
from infergrid.operator.kube import ApiError, KubeClient
from infergrid.testbed.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "inferenceservices.infergrid.dev.yaml"
CHILD_LISTS = {
    "deployments": "/apis/apps/v1/namespaces/{ns}/deployments",
    "services": "/api/v1/namespaces/{ns}/services",
    "pdbs": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "networkpolicies": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
}
CHILDREN_PER_SERVICE = {"deployments": 1, "services": 2, "pdbs": 1, "networkpolicies": 1}


def service_body(index: int, namespace: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": f"svc-{index:04d}", "namespace": namespace},
        "spec": {"model": {"source": f"file:///models/m{index % 7}"}, "replicas": replicas},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (and its reaped children), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def count_done(api: KubeClient, namespace: str, num: int) -> dict[str, int]:
    selector = {"labelSelector": f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"}
    counts = {}
    for name, path in CHILD_LISTS.items():
        listing = await api.request("GET", path.format(ns=namespace), params=selector)
        counts[name] = len(listing.get("items", []))
    listing = await api.request("GET", f"/apis/{c.API_VERSION}/namespaces/{namespace}/{c.PLURAL}")
    counts["observed"] = sum(
        1 for item in listing.get("items", [])
        if (item.get("status") or {}).get("observedGeneration") == item["metadata"]["generation"])
    return counts


def is_complete(counts: dict[str, int], num: int) -> bool:
    return counts["observed"] >= num and all(counts[k] >= v * num for k, v in CHILDREN_PER_SERVICE.items())


async def create_all(api: KubeClient, bodies: list[dict[str, Any]], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> None:
        async with gate:
            await api.create(body)

    await asyncio.gather(*(one(b) for b in bodies))


async def run_bench(cp: ControlPlane, args: argparse.Namespace) -> dict[str, Any]:
    api = KubeClient.from_environment(str(cp.kubeconfig), retries=8)
    namespace = "bench"
    await api.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": namespace}})
    env = {**cp.env, "KUBECONFIG": str(cp.kubeconfig)}
    log = open(cp.workdir / "operator.log", "wb")  # noqa: SIM115 - closed below
    operator = subprocess.Popen(
        [sys.executable, "-m", "infergrid.operator.main", "--standalone", "--quiet",
         "--metrics-port", "0", "--health-port", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await asyncio.sleep(3)  # let the operator list and start its watches
        pids = {"operator": operator.pid, **cp.pids()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        bodies = [service_body(i, namespace, args.replicas) for i in range(args.services)]
        t0 = time.perf_counter()
        await create_all(api, bodies, args.concurrency)
        created_s = time.perf_counter() - t0
        counts: dict[str, int] = {}
        deadline = t0 + args.timeout
        while time.perf_counter() < deadline:
            counts = await count_done(api, namespace, args.services)
            if args.verbose:
                print(f"  t={time.perf_counter() - t0:5.1f}s {counts}", flush=True)
            if is_complete(counts, args.services):
                break
            await asyncio.sleep(1.0)
        total_s = time.perf_counter() - t0
        rss = peak_rss_mib(operator.pid)
        cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 1) for name, pid in pids.items()}
        ok = is_complete(counts, args.services)
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(timeout=15)
        except subprocess.TimeoutExpired:
            operator.kill()
        log.close()
        await api.close()
    return {
        "services": args.services,
        "replicas_per_service": args.replicas,
        "create_seconds": round(created_s, 2),
        "reconciled_seconds": round(total_s, 2) if ok else None,
        "complete": ok,
        "final_counts": counts,
        "operator_peak_rss_mib": round(rss, 1),
        "cpu_seconds_during_run": cpu,
        "target_seconds": 60,
        "machine": f"{os.cpu_count()} CPUs",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=0,
                        help="worker replicas per service (pods add controller-manager/KWOK load, not operator work)")
    parser.add_argument("--concurrency", type=int, default=32, help="parallel create requests")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--verbose", action="store_true", help="print progress every second")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "operator.json")
    args = parser.parse_args()

    gpus = max(8, args.replicas * args.services // 10 + 8)
    with ControlPlane(nodes=10 if args.replicas else 1, gpus_per_node=gpus) as cp:
        cp.kubectl("apply", "-f", str(CRD))
        cp.kubectl("wait", "--for=condition=Established", f"crd/{yaml.safe_load(CRD.read_text())['metadata']['name']}")
        try:
            result = asyncio.run(run_bench(cp, args))
        except ApiError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1

    rows = [
        ("create N InferenceServices (baseline: API server only)", f"{result['create_seconds']:.1f} s"),
        ("create -> all children + status reconciled",
         f"{result['reconciled_seconds']:.1f} s" if result["complete"] else f"incomplete {result['final_counts']}"),
        ("target", f"<= {result['target_seconds']} s"),
        ("operator peak RSS", f"{result['operator_peak_rss_mib']:.0f} MiB"),
        *[(f"CPU seconds: {name}", f"{sec:.1f}") for name, sec in result["cpu_seconds_during_run"].items()],
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\noperator scale: {result['services']} InferenceServices x {result['replicas_per_service']} "
          f"replicas, {result['machine']}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if result["complete"] and result["reconciled_seconds"] <= result["target_seconds"] else 2


if __name__ == "__main__":
    sys.exit(main())
