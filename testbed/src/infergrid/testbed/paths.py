"""Where the test bed keeps its caches (binaries, Go module and build caches)."""

from __future__ import annotations

import os
from pathlib import Path

from infergrid.testbed import versions


def cache_root() -> Path:
    """Root of every infergrid cache: $INFERGRID_CACHE, else ~/.cache/infergrid."""
    env = os.environ.get("INFERGRID_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "infergrid").resolve()


def bin_dir(kube_version: str = versions.KUBERNETES) -> Path:
    """Directory holding the built control-plane binaries for one Kubernetes version."""
    return cache_root() / "testbed" / kube_version / "bin"


def go_root() -> Path:
    """GOPATH used for our builds (module cache under it), shared across versions."""
    return cache_root() / "go"


def repo_root() -> Path:
    """The infergrid repository root (this file lives in testbed/src/infergrid/testbed/)."""
    return Path(__file__).resolve().parents[4]


def go_modules_dir() -> Path:
    """The Go tool modules (testbed/go/) inside the repository."""
    return repo_root() / "testbed" / "go"


BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
