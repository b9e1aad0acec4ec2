"""bench/bench_spec_decode.py stays runnable: a tiny CPU run, the way the GPU run is invoked."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_spec_decode_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "spec_decode.json"
    env = dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src", "operator/src", "testbed/src")))
    cmd = [sys.executable, "bench/bench_spec_decode.py", "--shape", "tiny", "--batch-sizes", "1", "4",
           "--max-tokens", "24", "--prompt-len", "48", "--draft-layers", "1", "--agreements", "0.8", "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"smoke run took {elapsed:.1f} s"
    assert "| draft=target | 4 |" in proc.stdout and "mean accept len" in proc.stdout

    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and not report["errors"]
    rows = {(r["mode"], r["batch_size"]): r for r in report["results"]}
    modes = ("off", "off-sync", "ngram", "draft", "draft=target", "copy:off", "copy:off-sync", "copy:ngram",
             "copy:draft", "agree0.8:off", "agree0.8:ngram", "agree0.8:draft", "draft-fp8", "copy:draft-fp8",
             "agree0.8:draft-fp8")
    assert set(rows) == {(m, b) for m in modes for b in (1, 4)}
    for (mode, bs), r in rows.items():
        assert r["output_tokens"] == 24 * bs and r["tokens_per_s"] > 0 and r["speedup"] > 0
        # paired: one ratio per repeat, over the family's "off" in the same repeat
        assert len(r["speedup_all"]) == r["repeats"] and r["speedup"] == statistics.median(r["speedup_all"])
        assert r["token_agreement_with_off"] == 1.0  # float32 on CPU: greedy output is identical
        if mode.endswith("off"):
            assert r["speedup"] == 1.0 and r["num_drafts"] == 0 and r["acceptance_rate"] is None
    for bs in (1, 4):
        upper = rows[("draft=target", bs)]
        assert upper["acceptance_rate"] >= 0.99 and upper["mean_acceptance_length"] > 4.5  # k = 4
        assert sum(upper["accepted_per_pos"]) == upper["num_accepted_tokens"]
        random_draft = rows[("draft", bs)]
        assert random_draft["acceptance_rate"] is None or random_draft["acceptance_rate"] < 0.3
        assert rows[("ngram", bs)]["num_steps"] < rows[("off", bs)]["num_steps"]
        # A model that repeats its input is easy to predict (k is fixed: both proposers speculate).
        assert rows[("copy:ngram", bs)]["acceptance_rate"] >= 0.9
        assert rows[("copy:ngram", bs)]["num_steps"] < rows[("copy:off", bs)]["num_steps"]
        assert rows[("copy:draft", bs)]["acceptance_rate"] >= 0.9


def test_agree_modes_accept_the_chosen_share_of_drafts(tmp_path):
    """The "agree" checkpoints and prompts give the acceptance they are built for: with k = 4 fixed,
    drafts that agree with the target on a share p = 0.8 of the tokens are accepted
    at (p + p^2 + p^3 + p^4) / 4 = 0.59 of the proposed drafts, 1 + 4 * 0.59 = 3.36 tokens a step."""
    out = tmp_path / "agree.json"
    env = dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src", "operator/src", "testbed/src")))
    cmd = [sys.executable, "bench/bench_spec_decode.py", "--shape", "tiny", "--batch-sizes", "4", "--max-tokens", "64",
           "--prompt-len", "96", "--draft-layers", "1", "--repeats", "1", "--modes", "agree:draft", "agree:ngram",
           "--agreements", "0.8", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["agree0.8:draft"]["acceptance_rate"] == pytest.approx(0.59, abs=0.12)
    assert rows["agree1:draft"]["acceptance_rate"] >= 0.95
    assert rows["agree1:ngram"]["acceptance_rate"] >= 0.95  # the prompt quotes the continuation
    assert rows["agree0.8:ngram"]["acceptance_rate"] < 0.9  # ... with a fifth of its tokens replaced
    assert all(r["token_agreement_with_off"] == 1.0 for r in rows.values())


def test_successor_maps_agree_on_the_chosen_share():
    sys.path.insert(0, str(REPO / "bench"))
    from shapes import FIRST_TOKEN_ID, successor_maps

    succ, draft = successor_maps(1000, seed=3, agreement=0.8)
    ordinary = torch.arange(FIRST_TOKEN_ID, 1000)
    assert sorted(succ.tolist()) == list(range(1000)) and sorted(draft.tolist()) == list(range(1000))
    assert (succ[:FIRST_TOKEN_ID] == torch.arange(FIRST_TOKEN_ID)).all()
    seen, t = set(), FIRST_TOKEN_ID  # one cycle through every ordinary id
    while t not in seen:
        seen.add(t)
        t = int(succ[t])
    assert len(seen) == ordinary.numel()
    assert (draft[ordinary] == succ[ordinary]).float().mean().item() == pytest.approx(0.8, abs=0.002)


def test_spec_step_trace_runs_on_cpu(tmp_path):
    env = dict(os.environ, INFERGRID_BENCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
    cmd = [sys.executable, "bench/trace_spec_step.py", "--tokens", "8", "--out-dir", str(tmp_path), "--",
           "--modes", "copy:draft", "--shape", "tiny", "--max-tokens", "16"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copy:draft: 8 tokens" in proc.stdout and "Self CPU time total" in proc.stdout
    assert (tmp_path / "trace_copy_draft.json.gz").stat().st_size > 1000
    # the host phases are timed (the wrappers found every method they wrap) and add up to the step
    phases = {line.split()[0]: float(line.split()[-2]) for line in proc.stdout.splitlines()
              if line.strip().endswith("us/step") and "copy:off" not in line}
    assert phases["step"] > 0 and phases["execute_model"] > 0 and phases["schedule"] > 0
    assert phases["execute_model"] + phases["schedule"] <= phases["step"]


def test_host_op_costs_runs_on_cpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
    proc = subprocess.run([sys.executable, "bench/host_op_costs.py", "--calls", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    costs = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in proc.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| call")}
    assert set(costs) == {"one tiny torch op (add_)", "stage a step: torch ops", "cut rejected rows: torch ops"}
    assert all(us > 0 for us in costs.values())


def test_fp8_lm_head_gemm_runs_on_cpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
    proc = subprocess.run([sys.executable, "bench/fp8_lm_head_gemm.py", "--hidden", "64", "--vocab", "512",
                           "--rows", "1", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "M |" not in line]
    assert [int(r[0]) for r in rows] == [1, 3]
    assert all(float(r[1]) > 0 and float(r[3]) > 0 and 0.0 <= float(r[6]) <= 1.0 for r in rows)
