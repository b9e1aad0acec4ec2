"""`DEMO_ONCE=1 make demo`: the laptop demo asks SmolLM2-135M-Instruct a question, prints its (right)
answer, exits 0 and leaves no process behind.

Runs `python -m infergrid.testbed.demo` (what `make demo` runs after install + testbed-build) from the
repository root with its own `INFERGRID_TESTBED_DIR`, so it never touches a developer's `.testbed/`.
Every process the demo starts inherits a marker in its environment; while the demo runs, a thread
records the marked pids and those the bed's state files name. Afterwards none of them may be alive.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from isvc_support import REPO

from infergrid.testbed.procs import pid_alive

pytestmark = pytest.mark.slow

MARKER = "INFERGRID_E2E_DEMO_RUN"


def pids_in_state(bed: Path) -> set[int]:
    """Pids recorded in the background bed's launch.json / state.json (supervisor, forwarder, extras, components)."""
    found: set[int] = set()
    for name in ("launch.json", "state.json"):
        try:
            data = json.loads((bed / name).read_text())
        except (OSError, ValueError):
            continue
        for key, value in data.items():
            if key in ("supervisor", "forwarder") and isinstance(value, int):
                found.add(value)
        found.update(e["pid"] for e in (data.get("extras") or {}).values() if isinstance(e, dict) and "pid" in e)
        found.update(p for p in (data.get("pids") or {}).values() if isinstance(p, int))
    return found


def marked_processes(token: str, bed: Path) -> dict[int, str]:
    """Live processes whose environment carries the marker, or whose argv names the bed directory."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER}={token}".encode() in environ.split(b"\0") or str(bed) in argv:
            if pid_alive(int(proc.name)):
                found[int(proc.name)] = argv
    return found


def test_demo_once_prints_the_real_models_answer_and_cleans_up(tmp_path: Path) -> None:
    bed = tmp_path / "bed"
    token = secrets.token_hex(8)
    env = {**os.environ, "DEMO_ONCE": "1", "INFERGRID_TESTBED_DIR": str(bed), MARKER: token}
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            seen.update(pids_in_state(bed))
            seen.update(marked_processes(token, bed))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = subprocess.run([sys.executable, "-m", "infergrid.testbed.demo"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        done.set()
        watcher.join()
    print(result.stdout[-4000:])
    print(result.stderr[-4000:], file=sys.stderr)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[demo] answer:")]
    assert len(lines) == 1, result.stdout[-3000:]
    assert "[demo] question: What is the capital of France?" in result.stdout
    answer = json.loads(result.stdout[result.stdout.index("\n{") + 1:result.stdout.index("\n}") + 2])
    assert answer["model"] == "smollm2", answer
    content = answer["choices"][0]["message"]["content"]
    assert "Paris" in content and content in lines[0], answer  # greedy: the real model knows
    assert answer["usage"]["completion_tokens"] > 0, answer
    assert "[demo] torn down" in result.stdout

    # the bed's supervisor, forwarder, etcd, apiserver, controller-manager, scheduler, kwok, pod runner, operator
    assert len(seen) >= 9, f"saw too few of the demo's processes to check: {sorted(seen)}"
    print(f"checked {len(seen)} processes of the demo: {sorted(seen)}")
    assert not [pid for pid in seen if pid_alive(pid)], "processes of the demo outlived it"
    assert marked_processes(token, bed) == {}
    assert not (bed / "launch.json").exists() and not (bed / "state.json").exists()
