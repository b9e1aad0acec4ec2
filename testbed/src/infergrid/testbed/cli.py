"""`python -m infergrid.testbed.cli` — build, start and stop the local test bed.

    build [--regen]           build the pinned binaries into ~/.cache/infergrid/testbed/<ver>/bin
    up [--nodes N] [--no-pod-runner] [--run NAME=CMD]
                              start control plane + pod runner in the background, inside a pod netns;
                              .testbed/kubeconfig works from the host (through a forwarder) and inside
    down                      stop everything `up` started, by pid
    status                    print the state of the background test bed
    exec -- CMD...            run CMD in a fresh pod netns (what `make test` does with pytest)
    nsexec -- CMD...          run CMD inside the background test bed's netns (KUBECONFIG set)
    kubectl -- ARGS...        the test bed's kubectl with .testbed/kubeconfig
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from infergrid.testbed import build as build_mod
from infergrid.testbed import netns, paths
from infergrid.testbed import state as st
from infergrid.testbed.procs import free_port, pid_alive, pid_cmdline, spawn, terminate_pid


def _say(msg: str) -> None:
    print(f"[testbed] {msg}", flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    """Build (or verify) the binaries."""
    return build_mod.main(["--regen"] if args.regen else [])


def up(nodes: int = 2, pod_runner: bool = True, run: list[str] | None = None, timeout: float = 120.0) -> st.UpState:
    """Start the background test bed (idempotent); return its state. Raises RuntimeError on failure."""
    bed = st.current()
    if bed.supervisor_pid() and bed.state_file.exists():
        _say(f"already up (supervisor pid {bed.supervisor_pid()}); kubeconfig {bed.kubeconfig}")
        return bed
    if bed.supervisor_pid():
        down()
    gone = build_mod.missing()
    if gone:
        raise RuntimeError(f"binaries missing or stale: {gone}; run `make testbed-build` first")
    bed.root.mkdir(parents=True, exist_ok=True)
    for f in (bed.state_file, bed.kubeconfig):
        f.unlink(missing_ok=True)
    t0 = time.monotonic()
    port = free_port()
    sock = bed.socket_path()
    fwd = spawn("forwarder", [sys.executable, "-m", st.FORWARD_MODULE, f"--listen=tcp:127.0.0.1:{port}",
                              f"--connect=unix:{sock}"], bed.root / "forwarder.log")
    sup_cmd = [sys.executable, "-m", st.SUPERVISOR_MODULE, f"--api-port={port}", f"--socket={sock}",
               f"--nodes={nodes}"]
    if not pod_runner:
        sup_cmd.append("--no-pod-runner")
    for r in run or []:
        sup_cmd.append(f"--run={r}")
    env = dict(os.environ, INFERGRID_TESTBED_DIR=str(bed.root), **{netns.ENV_MARK: "1"})
    sup = spawn("supervisor", netns.netns_argv(sup_cmd), bed.root / "supervisor.log", env=env)
    bed.write("launch", {"supervisor": sup.pid, "forwarder": fwd.pid, "socket": str(sock), "api_port": port})
    deadline = time.monotonic() + timeout
    while not bed.state_file.exists():
        if not sup.alive() or time.monotonic() > deadline:
            tail = sup.log_tail(40)
            down()
            raise RuntimeError(f"test bed did not come up; supervisor log:\n{tail}")
        time.sleep(0.1)
    # the host side must work too: the forwarder relays 127.0.0.1:port to the netns
    kubectl = paths.bin_dir() / "kubectl"
    res = subprocess.run([str(kubectl), f"--kubeconfig={bed.kubeconfig}", "get", "nodes"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        down()
        raise RuntimeError(f"host kubectl through the forwarder failed: {res.stderr}")
    state = bed.read()
    _say(f"up in {time.monotonic() - t0:.1f}s (control plane {state.get('start_seconds')}s); "
         f"export KUBECONFIG={bed.kubeconfig}")
    print(res.stdout, end="")
    return bed


def cmd_up(args: argparse.Namespace) -> int:
    """`up`."""
    try:
        up(nodes=args.nodes, pod_runner=not args.no_pod_runner, run=args.run)
    except RuntimeError as e:
        print(f"testbed up failed: {e}", file=sys.stderr)
        return 1
    return 0


def start_in_netns(name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start a detached process inside the background test bed's netns; `down` stops it. Returns its pid."""
    bed = st.current()
    sup = bed.supervisor_pid()
    if not sup:
        raise RuntimeError("the test bed is not up")
    full_env = dict(os.environ if env is None else env, KUBECONFIG=str(bed.kubeconfig), **{netns.ENV_MARK: "1"})
    full_env["PATH"] = os.pathsep.join([str(paths.bin_dir()), os.path.dirname(sys.executable),
                                        full_env.get("PATH", "")])
    proc = spawn(name, netns.nsenter_argv(sup, argv), bed.log_dir / f"{name}.log", env=full_env)
    launch = bed.read("launch")
    launch.setdefault("extras", {})[name] = {"pid": proc.pid, "argv0": argv[0]}
    bed.write("launch", launch)
    return proc.pid


def _ours(pid: int, needle: str) -> bool:
    return pid_alive(pid) and any(needle in a for a in pid_cmdline(pid))


def down() -> None:
    """Stop the background test bed: supervisor (which stops its children), then leftovers, forwarder."""
    bed = st.current()
    launch, state = bed.read("launch"), bed.read("state")
    for name, extra in (launch.get("extras") or {}).items():
        if _ours(extra["pid"], extra["argv0"]):
            _say(f"stopping {name} (pid {extra['pid']})")
            terminate_pid(extra["pid"], timeout=20, group=True)
    sup = launch.get("supervisor")
    if sup and _ours(sup, st.SUPERVISOR_MODULE):
        terminate_pid(sup, timeout=60, group=False)
    argv0 = state.get("argv0") or {}
    for name, pid in (state.get("pids") or {}).items():
        cmdline = pid_cmdline(pid)
        if pid_alive(pid) and cmdline and cmdline[0] == argv0.get(name):
            _say(f"stopping leftover {name} (pid {pid})")
            terminate_pid(pid, timeout=10, group=True)
    fwd = launch.get("forwarder")
    if fwd and _ours(fwd, st.FORWARD_MODULE):
        terminate_pid(fwd, timeout=5, group=False)
    sock = launch.get("socket")
    if sock:
        try:
            os.unlink(sock)
        except OSError:
            pass
    for f in (bed.state_file, bed.launch_file):
        f.unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace) -> int:
    """`down`."""
    down()
    _say("down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`status`: 0 when up."""
    bed = st.current()
    pid = bed.supervisor_pid()
    if not pid:
        _say("not running")
        return 1
    print(json.dumps(bed.read(), indent=2))
    return 0


def _strip_dashes(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def cmd_exec(args: argparse.Namespace) -> int:
    """`exec -- CMD`: replace this process by CMD in a fresh pod netns."""
    cmd = _strip_dashes(args.cmd)
    if not cmd:
        print("usage: cli exec -- CMD ...", file=sys.stderr)
        return 2
    netns.exec_in_netns(cmd)
    return 127  # not reached


def cmd_nsexec(args: argparse.Namespace) -> int:
    """`nsexec -- CMD`: run CMD inside the background test bed's namespace."""
    cmd = _strip_dashes(args.cmd)
    bed = st.current()
    pid = bed.supervisor_pid()
    if not pid or not cmd:
        print("nsexec: the test bed is not up (cli up) or no command given", file=sys.stderr)
        return 2
    env = dict(os.environ, KUBECONFIG=str(bed.kubeconfig), **{netns.ENV_MARK: "1"})
    env["PATH"] = os.pathsep.join([str(paths.bin_dir()), os.path.dirname(sys.executable), env.get("PATH", "")])
    argv = netns.nsenter_argv(pid, cmd)
    os.execvpe(argv[0], argv, env)
    return 127


def cmd_kubectl(args: argparse.Namespace) -> int:
    """`kubectl -- ARGS`."""
    bed = st.current()
    kubectl = shutil.which("kubectl", path=str(paths.bin_dir())) or "kubectl"
    argv = [kubectl, f"--kubeconfig={bed.kubeconfig}", *_strip_dashes(args.cmd)]
    os.execv(argv[0], argv)
    return 127


def main(argv: list[str] | None = None) -> int:
    """Entry point (also the `infergrid-testbed` script)."""
    ap = argparse.ArgumentParser(prog="infergrid.testbed.cli", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build the pinned binaries")
    p.add_argument("--regen", action="store_true", help="regenerate testbed/go/*/go.mod + go.sum")
    p.set_defaults(fn=cmd_build)
    p = sub.add_parser("up", help="start the background test bed")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--no-pod-runner", action="store_true")
    p.add_argument("--run", action="append", default=[], metavar="NAME=CMD")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the background test bed").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="show the background test bed").set_defaults(fn=cmd_status)
    for name, fn in (("exec", cmd_exec), ("nsexec", cmd_nsexec), ("kubectl", cmd_kubectl)):
        p = sub.add_parser(name, help=f"{name} -- CMD ...")
        p.add_argument("cmd", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
