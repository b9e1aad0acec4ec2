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
           "--max-num-batched-tokens", "128", "--repeats", "1"]  # several admission steps: later requests hit
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
    assert [len(report["runs"][m]) for m in ("off", "on")] == [1, 1]


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("worker/src", "operator/src", "testbed/src")))


def test_offline_bench_runs_on_cpu(tmp_path):
    """bench/bench_offline.py: ours and transformers on the same tiny workloads, the floor columns."""
    out = tmp_path / "offline.json"
    proc = subprocess.run([sys.executable, "bench/bench_offline.py", "--smoke", "--out", str(out)], cwd=REPO,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["workload"]: r for r in report["rows"]}
    assert set(rows) == {"mixed256", "b64", "b1"} and report["commit"] and report["command"]
    mixed = rows["mixed256"]
    assert mixed["ours_output_tokens"] == [8 * 8] * 2  # 8 requests x 8 tokens, 2 repeats, EOS ignored
    assert mixed["transformers_output_tokens"] == [8 * 8] and mixed["ratio_to_transformers"] > 0
    assert mixed["greedy_agreement"]["identical_share"] >= 0.75  # float32 on a CPU: the same greedy text
    assert rows["b1"]["ours_output_tokens"] == [8, 8] and "fraction_of_roofline" in rows["b1"]


def test_serving_bench_runs_against_a_worker_on_cpu(tmp_path):
    """bench/bench_serving.py starts a tiny worker, sends Poisson and all-at-once load, 0 failures."""
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, "bench/bench_serving.py", "--smoke", "--out", str(out),
                           "--worker-log", str(tmp_path / "worker.log")], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Time to First Token" in proc.stdout and "| inf |" in proc.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [4.0, "inf"]
    for r in runs:
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (6, 0, 6 * 8)
        assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] <= r["p99_e2el_ms"] and r["median_tpot_ms"] > 0


def test_gemv_shapes_bench_runs_on_cpu():
    """bench/gemv_shapes.py (decode-size products and argmax) stays runnable: shapes / 16 on a CPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
    proc = subprocess.run([sys.executable, "bench/gemv_shapes.py", "--smoke", "--batch", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 8b/tp2 ")]
    assert len(rows) == 5 and all(float(r.split("|")[3]) > 0 for r in rows)
    assert "| argmax | 1 |" in proc.stdout


def test_ngram_real_text_bench_runs_on_cpu(tmp_path, smollm2):
    out = tmp_path / "ngram_real.json"
    cmd = [sys.executable, "bench/bench_ngram_real.py", "--model", smollm2, "--ks", "4", "--max-tokens", "32",
           "--prompts", "repeat-article", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "acceptance" in proc.stdout and "repeat-article" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["k"] == 4 and row["same_text_as_off"] and row["drafts_proposed"] > 0
    assert row["acceptance"] > 0.5  # the greedy reply copies the article


def test_structured_output_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "structured.json"
    env = dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src", "operator/src", "testbed/src")))
    cmd = [sys.executable, "bench/bench_structured_output.py", "--device", "cpu", "--batch", "4", "--max-tokens", "12",
           "--repeats", "1", "--out", str(out), "--profile-dir", str(tmp_path / "prof"), "--profile-tokens", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| half constrained |" in proc.stdout and "WARNING" not in proc.stdout
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["all_requests_ran_to_max_tokens"]
    for mode in ("unconstrained", "half constrained"):
        result = report["results"][mode]
        assert result["tokens"] == [4 * 12]
        # the host's time per step, split at the runner's forward and sampler calls
        assert result["forward_ms_per_step"][0] > 0 and result["sampler_ms_per_step"][0] > 0
        assert result["other_host_ms_per_step"][0] > 0
        tag = mode.replace(" ", "_")
        assert (tmp_path / "prof" / f"trace_{tag}.json").stat().st_size > 0
        assert "aten::" in (tmp_path / "prof" / f"profile_{tag}.txt").read_text()
        assert report["profiled"][mode]["steps"] >= 4 and report["profiled"][mode]["wall_ms_per_step"] > 0
    assert report["results"]["half constrained"]["fill_ms_per_step"][0] > 0
    assert report["half_constrained_vs_unconstrained"] > 0


def test_compare_revisions_runs_each_tree_with_its_own_sources(tmp_path):
    """bench/compare_revisions.py: a 'before' tree made by `make bench-before` and this tree, one round;
    each tree's runs import the worker from that tree."""
    before = tmp_path / "before"
    subprocess.run(["make", "-s", "bench-before", "REV=HEAD", f"BEFORE_DIR={before}"], cwd=REPO, check=True,
                   capture_output=True)
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "bench/compare_revisions.py", "--before", str(before), "--rounds", "1", "--out", str(out),
           "--", "--shape", "tiny", "--batch-sizes", "1", "--max-tokens", "8", "--modes", "off", "ngram"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["commits"]["before"] == (before / "COMMIT").read_text().strip()
    assert report["worker_sources"]["before"].startswith(str(before.resolve()))
    assert report["worker_sources"]["after"].startswith(str(REPO / "worker" / "src"))
    rows = {(r["mode"], r["batch_size"]): r for r in report["rows"]}
    assert set(rows) == {("off", 1), ("ngram", 1)}
    for r in rows.values():
        assert len(r["before_tok_s_all"]) == len(r["after_tok_s_all"]) == len(r["after_over_before_all"]) == 1
    assert rows[("off", 1)]["before_speedup_all"] == rows[("off", 1)]["after_speedup_all"] == [1.0]
    assert "| ngram" in proc.stdout
