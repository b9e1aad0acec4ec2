"""Fixtures for the operator's integration tests (the test-bed fixtures come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from operator_cluster import OperatorProcess, install_crds, install_operator_rbac, reset_peering

from infergrid.testbed.controlplane import ControlPlane


@pytest.fixture(scope="session")
def infergrid_crds(control_plane: ControlPlane) -> ControlPlane:
    """The InferenceService and kopf peering CRDs, established."""
    install_crds(control_plane)
    return control_plane


@pytest.fixture(scope="session")
def operator_kubeconfig(infergrid_crds: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig for the chart's operator ServiceAccount (bound to the chart's ClusterRole)."""
    return install_operator_rbac(infergrid_crds, tmp_path_factory.mktemp("operator-rbac"))


@pytest.fixture
def make_operator(control_plane: ControlPlane, operator_kubeconfig: Path,
                  tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """Factory for operator subprocesses under the chart's RBAC; all are stopped after the test."""
    reset_peering(control_plane)
    started: list[OperatorProcess] = []

    def make(identity: str = "operator-0", *args: str, wait: bool = True) -> OperatorProcess:
        proc = OperatorProcess(operator_kubeconfig, tmp_path, identity, args)
        started.append(proc)
        return proc.start(wait=wait)

    try:
        yield make
    finally:
        for proc in started:
            proc.stop()
        for proc in started:
            print(f"--- log of operator {proc.identity} (tail)\n{proc.log_tail(30)}")


@pytest.fixture
def operator(make_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    """One running operator (cluster-wide, with peering, as the chart deploys it)."""
    return make_operator()
