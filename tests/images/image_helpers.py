"""Helpers of the image smoke tests: docker, image metadata, and a handle on a background test bed."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from infergrid.testbed import paths

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "infergrid"



@dataclass(frozen=True)
class Images:
    """The images `make images` built, named as the chart names them."""

    version: str
    worker: str
    operator: str
    worker_repository: str
    operator_repository: str


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class TestBed:
    """A background test bed (`cli up`) in its own state dir, with a pod runner for worker pods only."""

    root: Path
    kubeconfig: Path
    env: dict[str, str]

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(paths.bin_dir() / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=check, input=input, timeout=120)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(paths.bin_dir() / "helm"), "--kubeconfig", str(self.kubeconfig), *args]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=300)

    def nsexec(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command inside the test bed's network namespace (where pod IPs answer)."""
        return subprocess.run([sys.executable, "-m", "infergrid.testbed.cli", "nsexec", "--", *argv],
                              capture_output=True, text=True, env=self.env, timeout=timeout)


def host_kubeconfig(bed: TestBed, directory: Path) -> Path:
    """A copy of the test bed's kubeconfig readable by the operator image's non-root uid."""
    copy = directory / "kubeconfig"
    copy.write_text(bed.kubeconfig.read_text())
    copy.chmod(0o644)
    directory.chmod(0o755)
    return copy


def labels_of(ref: str) -> dict[str, str]:
    out = docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref).stdout
    return yaml.safe_load(out) or {}


def user_of(ref: str) -> str:
    return docker("image", "inspect", "--format", "{{.Config.User}}", ref).stdout.strip()


def is_semver(text: str) -> bool:
    return re.fullmatch(r"\d+\.\d+\.\d+([-+].*)?", text) is not None
