"""The pod network namespace that `cli exec` (and so `make test`) runs the suite in."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from infergrid.testbed import netns

pytestmark = pytest.mark.controlplane


def test_suite_runs_where_pod_ips_are_local() -> None:
    assert netns.in_pod_netns(), "run the suite through `python -m infergrid.testbed.cli exec -- ...`"
    with socket.socket() as server:
        server.bind(("10.244.0.7", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("10.244.0.7", port), timeout=5) as client:
            conn, peer = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()


def test_exec_creates_a_fresh_namespace_with_the_pod_route() -> None:
    code = "from infergrid.testbed.netns import in_pod_netns; import socket; s=socket.socket(); " \
           "s.bind(('10.244.3.9', 0)); print(in_pod_netns())"
    out = subprocess.run(netns.netns_argv([sys.executable, "-c", code]), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
