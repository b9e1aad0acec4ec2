"""The pod network: an unprivileged user + network namespace where the pod CIDR is local.

Inside, ``lo`` is up and ``10.244.0.0/16`` is routed ``local`` on it, so any process can bind any pod
IP that KWOK assigned and every other process in the namespace can reach it; ``10.96.0.0/16`` (the
Service range) is routed on ``lo`` too, where kube-proxy's nftables rules turn ClusterIPs into pod
IPs. No root is needed (``unshare --user --map-root-user --net``); as root the same command works
too. Traffic to pod IPs never leaves the namespace.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
from collections.abc import Sequence

POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
ENV_MARK = "INFERGRID_NETNS"
_PROBE_IP = "10.244.255.254"
#: Source address of connections to Service ClusterIPs (a pod-CIDR address KWOK never assigns), so
#: kube-proxy's DNAT to a pod IP has a routable reply path.
SERVICE_SOURCE_IP = "10.244.255.253"


def _tool(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
    found = shutil.which(name, path=path)
    if not found:
        raise FileNotFoundError(f"`{name}` not found (install util-linux / iproute2)")
    return found


def in_pod_netns() -> bool:
    """True when this process can bind a pod-CIDR address (i.e. it runs inside a pod netns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_PROBE_IP, 0))
        except OSError:
            return False
    return True


def setup_script(cidr: str = POD_CIDR) -> str:
    """Shell commands that prepare a fresh network namespace (run as its root): pod IPs are local,
    and the Service range is routed through lo so kube-proxy's rules can translate ClusterIPs."""
    ip = _tool("ip")
    return (f"{ip} link set lo up && {ip} route add local {cidr} dev lo && "
            f"{ip} route add {SERVICE_CIDR} dev lo src {SERVICE_SOURCE_IP}")


def netns_argv(cmd: Sequence[str], cidr: str = POD_CIDR) -> list[str]:
    """argv that runs `cmd` in a fresh user+network namespace set up for the pod CIDR."""
    return [
        _tool("unshare"), "--user", "--map-root-user", "--net", "--",
        "/bin/sh", "-c", f'{setup_script(cidr)} && exec "$@"', "infergrid-netns", *cmd,
    ]


def nsenter_argv(pid: int, cmd: Sequence[str]) -> list[str]:
    """argv that runs `cmd` inside the user+network namespace of process `pid`."""
    return [_tool("nsenter"), "-t", str(pid), "-U", "-n", "--preserve-credentials", "-F", "--", *cmd]


def exec_in_netns(cmd: Sequence[str]) -> None:
    """Replace this process by `cmd` running in a fresh pod netns (directly, if already inside one)."""
    if not cmd:
        raise ValueError("no command given")
    env = dict(os.environ)
    # inside the namespace our uid reads as 0; keep tools that key on the user name (pytest's
    # /tmp/pytest-of-USER) on the real user's files
    try:
        env.setdefault("USER", pwd.getpwuid(os.getuid()).pw_name)
        env.setdefault("LOGNAME", env["USER"])
    except KeyError:
        pass
    if in_pod_netns():
        argv = list(cmd)
    else:
        argv = netns_argv(cmd)
        env[ENV_MARK] = "1"
    os.execvpe(argv[0], argv, env)
