"""The benchmarks stay runnable: tiny CPU runs, the way the GPU runs are invoked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prefix_cache_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "prefix_cache.json"
    env = dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src", "operator/src", "testbed/src")))
    cmd = [sys.executable, "bench/bench_prefix_cache.py", "--shape", "tiny", "--num-requests", "16",
           "--prefix-len", "64", "--max-tokens", "8", "--out", str(out),
           "--max-num-batched-tokens", "128"]  # several admission steps, so later requests hit the prefix
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"smoke run took {elapsed:.1f} s"
    assert "TTFT p50 speedup" in proc.stdout and "| on |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["num_shared_prefix_requests"] == 14
    off, on = report["results"]["off"], report["results"]["on"]
    for r in (off, on):
        assert r["num_requests"] == 16 and r["output_tokens"] == 16 * 8 and len(r["ttft_s"]) == 16
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["wall_s"]
    assert (off["prefix_cache_queries"], off["prefix_cache_hits"], off["hit_rate"]) == (0, 0, 0.0)
    assert on["prefix_cache_queries"] == 16 * (64 + 32)
    assert 0 < on["hit_rate"] < 1 and on["prefix_cache_hits"] % 16 == 0
    assert on["cached_tokens_reported"] == on["prefix_cache_hits"]
    assert report["ttft_p50_speedup"] == off["ttft_p50_s"] / on["ttft_p50_s"]


def test_gemv_shapes_bench_runs_on_cpu():
    """bench/gemv_shapes.py (decode-size products and argmax) stays runnable: shapes / 16 on a CPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
    proc = subprocess.run([sys.executable, "bench/gemv_shapes.py", "--smoke", "--batch", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 8b/tp2 ")]
    assert len(rows) == 5 and all(float(r.split("|")[3]) > 0 for r in rows)
    assert "| argmax | 1 |" in proc.stdout
