"""Before/after of a benchmark across two source trees, in one run on one machine.

    make bench-before REV=<commit>      # git archive of that commit into build/before (carry it to the GPU)
    python3 bench/compare_revisions.py --before build/before --rounds 2 --out spec_ab.json -- --max-tokens 128

Runs `bench/bench_spec_decode.py` (or --bench) of each tree with that tree's own sources on
PYTHONPATH, alternating the trees over --rounds (before/after, then after/before, ...) so that drifts in
the machine's speed hit both alike; each run is one repeat of every mode (`--repeats 1`, its modes
interleaved as usual). Per (mode, batch size) row it prints the paired speedup over "off" of each tree
(the median of the rounds and their range) and after's tok/s over before's, and writes JSON with both
trees' commits, the device and the exact command. Rows present in only one tree are listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def tree_commit(tree: Path) -> str:
    """A tree's commit: its COMMIT file (written by `make bench-before`), else git, else INFERGRID_COMMIT."""
    marker = tree / "COMMIT"
    if marker.exists():
        return marker.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("INFERGRID_COMMIT", "unknown")


def tree_env(tree: Path) -> dict[str, str]:
    """The environment a tree's runs get: its own packages first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(tree / p) for p in ("common/src", "worker/src")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    return env


def worker_source(tree: Path) -> str:
    """Where `infergrid.worker` is imported from in a tree's runs; raises unless it is inside the tree."""
    proc = subprocess.run([sys.executable, "-c", "import infergrid.worker as w; print(w.__file__)"],
                          env=tree_env(tree), cwd=tree, capture_output=True, text=True, check=True)
    path = proc.stdout.strip().splitlines()[-1]
    if not Path(path).resolve().is_relative_to(tree):
        raise RuntimeError(f"runs of {tree} would import infergrid.worker from {path}, outside the tree")
    return path


def run_once(tree: Path, bench: str, bench_args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """One run of `bench` from `tree` with that tree's packages first on the path; its JSON report."""
    env = tree_env(tree)
    cmd = [sys.executable, str(tree / bench), *bench_args, "--repeats", "1", "--out", str(out)]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=tree, timeout=timeout, text=True, capture_output=True)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    print(tail, flush=True)
    if not out.exists():
        raise RuntimeError(f"{cmd[1]} wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def collect(reports: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, list[float]]]:
    """(mode, batch size) -> {"speedup": [...], "tok_s": [...]} over the runs of one tree."""
    rows: dict[tuple[str, int], dict[str, list[float]]] = {}
    for report in reports:
        for r in report["results"]:
            row = rows.setdefault((r["mode"], r["batch_size"]), {"speedup": [], "tok_s": []})
            if r.get("speedup") is not None:
                row["speedup"].append(r["speedup"])
            row["tok_s"].append(r["tokens_per_s"])
    return rows


def summarize(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def compare(before: dict, after: dict) -> list[dict[str, Any]]:
    """One entry per row of either tree: speedups and the tok/s ratio after / before (per round pair)."""
    table = []
    for key in sorted(set(before) | set(after), key=lambda k: (k[1], k[0])):
        b, a = before.get(key), after.get(key)
        ratios = ([x / y for x, y in zip(a["tok_s"], b["tok_s"], strict=False) if y > 0] if a and b else [])
        table.append({
            "mode": key[0], "batch_size": key[1],
            "before_speedup_all": b["speedup"] if b else None, "after_speedup_all": a["speedup"] if a else None,
            "before_tok_s_all": b["tok_s"] if b else None, "after_tok_s_all": a["tok_s"] if a else None,
            "after_over_before_all": ratios,
        })
    return table


def print_table(table: list[dict[str, Any]], before_commit: str, after_commit: str) -> None:
    print(f"\nbefore = {before_commit}, after = {after_commit}; speedup over 'off' of the same tree and round "
          "(median [range] over rounds); after/before: tok/s of the same round")
    print(f"| {'mode':<20} | batch | {'before speedup':<22} | {'after speedup':<22} | after/before tok/s |")
    print(f"|{'-' * 22}|-------|{'-' * 24}|{'-' * 24}|--------------------|")
    for row in table:
        print(f"| {row['mode']:<20} | {row['batch_size']:>5} | {summarize(row['before_speedup_all'] or []):<22} | "
              f"{summarize(row['after_speedup_all'] or []):<22} | {summarize(row['after_over_before_all']):<18} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="source tree of the 'before' revision")
    p.add_argument("--after", type=Path, default=ROOT, help="source tree of the 'after' revision (default: this one)")
    p.add_argument("--bench", default="bench/bench_spec_decode.py", help="the benchmark, relative to each tree")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--run-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(own)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    sources = {name: worker_source(tree) for name, tree in trees.items()}
    reports: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for name in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                out = Path(tmp) / f"{name}_{rnd}.json"
                reports[name].append(run_once(trees[name], args.bench, bench_args, out, args.run_timeout))
    commits = {name: tree_commit(tree) for name, tree in trees.items()}
    table = compare(collect(reports["before"]), collect(reports["after"]))
    print_table(table, commits["before"], commits["after"])
    report = {
        "bench": "compare_revisions", "compared": args.bench, "commits": commits, "worker_sources": sources,
        "device": reports["after"][0].get("device"), "command": shlex.join([sys.executable, *sys.argv]),
        "rounds": args.rounds, "bench_args": bench_args, "seconds": time.monotonic() - started,
        "rows": table, "errors": {name: [r.get("errors") for r in runs] for name, runs in reports.items()},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
