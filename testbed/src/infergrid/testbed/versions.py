"""Pinned versions of everything the test bed builds from Go modules.

Kubernetes 1.34 is the newest minor whose upstream Go (1.24) is satisfied by any Go >= 1.24, and it
builds cleanly with Go 1.26. etcd follows the version Kubernetes' own go.mod requires; helm 3.19 uses
the same k8s.io/* minor so the two builds share most of the module and build cache.
"""

from __future__ import annotations

KUBERNETES = "v1.34.4"
ETCD = "v3.6.4"  # go.etcd.io/etcd/server/v3 as required by k8s.io/kubernetes v1.34.4's go.mod
KWOK = "v0.7.0"
HELM = "v3.19.5"

#: Oldest Go the pinned modules accept (their go.mod `go` lines); older toolchains fetch one via the proxy.
MIN_GO = (1, 24)


def kube_minor(version: str = KUBERNETES) -> str:
    """Return the minor number of a `vX.Y.Z` Kubernetes version, e.g. "34"."""
    return version.lstrip("v").split(".")[1]
