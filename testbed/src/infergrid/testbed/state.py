"""The state of a background test bed (`cli up`): files under .testbed/ and the pids to stop."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infergrid.testbed import paths
from infergrid.testbed.procs import pid_alive, pid_cmdline

SUPERVISOR_MODULE = "infergrid.testbed.supervisor"
FORWARD_MODULE = "infergrid.testbed.forward"


def state_dir() -> Path:
    """$INFERGRID_TESTBED_DIR, else .testbed/ at the repository root."""
    env = os.environ.get("INFERGRID_TESTBED_DIR")
    return Path(env).resolve() if env else paths.repo_root() / ".testbed"


@dataclass
class UpState:
    """Paths of one background test bed."""

    root: Path

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig, usable from the host and inside the namespace."""
        return self.root / "kubeconfig"

    @property
    def launch_file(self) -> Path:
        """Pids of the processes `cli up` launched (supervisor, forwarder) + socket path."""
        return self.root / "launch.json"

    @property
    def state_file(self) -> Path:
        """Written by the supervisor once everything is up: component pids, ports."""
        return self.root / "state.json"

    @property
    def run_dir(self) -> Path:
        """Control-plane workdir (etcd data, certs, logs)."""
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        """All logs."""
        return self.run_dir / "logs"

    def socket_path(self) -> Path:
        """A unix socket path short enough for sun_path (108 bytes)."""
        p = self.root / "apiserver.sock"
        if len(str(p)) < 100:
            return p
        return Path(tempfile.mkdtemp(prefix="igtb-")) / "api.sock"

    def read(self, which: str = "state") -> dict[str, Any]:
        """launch.json or state.json as a dict ({} when absent)."""
        f = self.state_file if which == "state" else self.launch_file
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, which: str, data: dict[str, Any]) -> None:
        """Atomically write launch.json or state.json."""
        f = self.state_file if which == "state" else self.launch_file
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(f)

    def supervisor_pid(self) -> int | None:
        """Pid of a live supervisor, else None."""
        pid = self.read("launch").get("supervisor")
        if pid and pid_alive(pid) and any(SUPERVISOR_MODULE in a for a in pid_cmdline(pid)):
            return int(pid)
        return None


def current() -> UpState:
    """The state of the test bed under state_dir()."""
    return UpState(state_dir())
