"""The background test bed's supervisor (started by `cli up` inside a fresh pod netns).

It runs the control plane, the pod runner and any extra processes inside the namespace, relays
``.testbed/apiserver.sock`` to the API server so the host-side forwarder can reach it, writes
``.testbed/state.json`` when everything is up, and stops everything by pid on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
import time

from infergrid.testbed import state as st
from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.forward import RelayThread
from infergrid.testbed.netns import in_pod_netns
from infergrid.testbed.procs import ManagedProcess, spawn


def main(argv: list[str] | None = None) -> int:
    """`python -m infergrid.testbed.supervisor --api-port P --socket PATH [--no-pod-runner] [--run NAME=CMD]`."""
    ap = argparse.ArgumentParser(prog=st.SUPERVISOR_MODULE)
    ap.add_argument("--api-port", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--no-pod-runner", action="store_true")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=CMD",
                    help="an extra process to run in the namespace (e.g. the operator)")
    args = ap.parse_args(argv)
    if not in_pod_netns():
        print("supervisor: must run inside the pod network namespace", file=sys.stderr)
        return 2
    bed = st.current()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    shutil.rmtree(bed.run_dir, ignore_errors=True)
    shutil.rmtree(bed.root / "pods", ignore_errors=True)
    bed.run_dir.mkdir(parents=True)
    cp = ControlPlane(workdir=bed.run_dir, api_port=args.api_port, nodes=args.nodes, keep_workdir=True,
                      kube_proxy=True)
    extras: dict[str, ManagedProcess] = {}
    relay: RelayThread | None = None
    try:
        cp.start()
        shutil.copyfile(cp.kubeconfig, bed.kubeconfig)
        os.chmod(bed.kubeconfig, 0o600)
        relay = RelayThread(f"unix:{args.socket}", f"tcp:127.0.0.1:{args.api_port}")
        relay.start()
        relay.started.wait(10)
        if relay.error:
            raise relay.error
        env = dict(cp.env, KUBECONFIG=str(bed.kubeconfig))
        if not args.no_pod_runner:
            extras["pod-runner"] = spawn(
                "pod-runner",
                [sys.executable, "-m", "infergrid.testbed.podrunner", f"--kubeconfig={bed.kubeconfig}",
                 f"--workdir={bed.root / 'pods'}", "--probe-period-cap=2"],
                bed.log_dir / "pod-runner.log", env=env, die_with_parent=True)
        for item in args.run:
            name, _, cmd = item.partition("=")
            extras[name] = spawn(name, shlex.split(cmd), bed.log_dir / f"{name}.log", env=env, die_with_parent=True)
        bed.write("state", {
            "supervisor": os.getpid(),
            "api_port": args.api_port,
            "server": cp.server,
            "kubeconfig": str(bed.kubeconfig),
            "socket": args.socket,
            "start_seconds": round(cp.start_seconds or 0, 2),
            "pids": {**cp.pids(), **{n: p.pid for n, p in extras.items()}},
            "argv0": {n: p.argv[0] for n, p in {**cp.procs, **extras}.items()},
            "logs": str(bed.log_dir),
            "ready_at": time.time(),
        })
        print(f"testbed up in {cp.start_seconds:.1f}s; kubeconfig {bed.kubeconfig}", flush=True)
        while not done.wait(1.0):
            for name, proc in extras.items():
                if not proc.alive():
                    print(f"{name} exited ({proc.popen.returncode}); see {proc.log_path}", flush=True)
            extras = {n: p for n, p in extras.items() if p.alive()}
    except BaseException as e:  # noqa: BLE001 - report, then clean up
        print(f"supervisor: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for proc in reversed(list(extras.values())):
            proc.stop(timeout=15)
        if relay is not None:
            relay.close()
        cp.stop()
        bed.state_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
