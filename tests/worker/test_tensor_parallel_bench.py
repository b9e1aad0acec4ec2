"""bench/bench_tensor_parallel.py stays runnable: a tiny CPU run (gloo), invoked the way the GPU run is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tensor_parallel_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "tensor_parallel.json"
    env = dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
    cmd = [sys.executable, "bench/bench_tensor_parallel.py", "--shape", "tiny", "--tp", "1", "2",
           "--batch-sizes", "1", "3", "--prompt-len", "16", "--decode-tokens", "6", "--sync-baseline", "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"smoke run took {elapsed:.1f} s"
    assert "| 2 | async | 3 |" in proc.stdout and "| 2 | sync | 3 |" in proc.stdout
    assert "TP=2 / TP=1 per-token latency at batch 1" in proc.stdout

    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["shape"]["name"] == "tiny"
    assert [(r["tp"], r["scheduling"]) for r in report["runs"]] == [(1, "async"), (2, "async"), (1, "sync"),
                                                                     (2, "sync")]
    assert [len(r["rank_pids"]) for r in report["runs"]] == [1, 2, 1, 2]
    results = {(r["tp"], r["batch_size"]): r for r in report["results"] if r["scheduling"] == "async"}
    assert set(results) == {(1, 1), (1, 3), (2, 1), (2, 3)}
    assert "sync_tp2_b1" in report["latency_ratio_vs_baseline"]
    for r in results.values():
        assert r["num_decode_steps"] == 6
        assert 0 < r["latency_p50_ms"] <= r["latency_p90_ms"]
        assert abs(r["tokens_per_s"] * r["latency_p50_ms"] / 1e3 - r["batch_size"]) < 1e-6
    ratio = report["latency_ratio_vs_baseline"]["tp2_b1"]
    assert ratio == results[(2, 1)]["latency_p50_ms"] / results[(1, 1)]["latency_p50_ms"]
    assert report["meets_target"] == (ratio <= report["target_tp2_latency_ratio"])
