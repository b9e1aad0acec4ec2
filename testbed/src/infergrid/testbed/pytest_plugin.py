"""pytest fixtures for tests on the real local control plane.

Register with ``pytest_plugins = ["infergrid.testbed.pytest_plugin"]`` (tests/conftest.py and
e2e/conftest.py do). Fixtures:

* ``control_plane`` (session) — a started :class:`~infergrid.testbed.controlplane.ControlPlane`:
  ``.kubeconfig``, ``.env`` (KUBECONFIG set, test-bed binaries first on PATH), ``.kubectl(*args,
  check=True, input=None)``, ``.server``, ``.bin_dir``, ``.client``, ``.set_pod_ready(ns, name)``.
  Fails (never skips) when the binaries are missing: run ``make testbed-build``.
* ``k8s_namespace`` (function) — a fresh namespace whose ``default`` ServiceAccount exists; deleted after.
* ``pod_runner`` (function) — a started :class:`~infergrid.testbed.podrunner.PodRunner` for
  ``k8s_namespace``; stopped (all processes killed) after the test. Needs the pod netns: run pytest
  through ``python -m infergrid.testbed.cli exec -- pytest ...`` (``make test`` does).
* ``make_pod_runner`` (function) — ``make_pod_runner(namespace=None, label_selector=None, **kw)`` for
  runners over other namespaces (None: all namespaces); each is stopped after the test. Test
  runners restart crashed containers after 0.5 s (doubling to 5 s) and probe at least every 1 s
  (failure budgets keep their length in seconds); pass ``backoff=``/``probe_period_cap=`` to change.

Every test using one of these fixtures gets the ``controlplane`` marker automatically.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infergrid.testbed.controlplane import ControlPlane, ControlPlaneError
from infergrid.testbed.netns import in_pod_netns
from infergrid.testbed.podrunner import Backoff, PodRunner

FIXTURES = {"control_plane", "k8s_namespace", "pod_runner", "make_pod_runner"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a test-bed fixture as `controlplane` (so -m selects it)."""
    for item in items:
        if FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.controlplane)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """The session's control plane (etcd, apiserver, controller-manager, scheduler, KWOK + 2 GPU nodes)."""
    cp = ControlPlane(kube_proxy=True)
    try:
        cp.check_binaries()
    except ControlPlaneError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        cp.start()
    except ControlPlaneError as e:
        pytest.fail(f"the test bed did not start: {e}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


def _namespace_name(node_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-") or "t"
    return f"{base}-{secrets.token_hex(3)}"


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (its `default` ServiceAccount exists); deleted after the test."""
    name = _namespace_name(request.node.name)
    client = control_plane.client
    client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while client.get(f"/api/v1/namespaces/{name}/serviceaccounts/default", ok_missing=True) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"ServiceAccount {name}/default did not appear in 30s", pytrace=False)
        time.sleep(0.1)
    try:
        yield name
    finally:
        client.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def make_pod_runner(control_plane: ControlPlane, tmp_path: Path) -> Iterator[Callable[..., PodRunner]]:
    """Factory for started pod runners; all are stopped after the test."""
    if not in_pod_netns():
        pytest.fail(
            "the pod runner needs the pod network namespace: run pytest via "
            "`python -m infergrid.testbed.cli exec -- python -m pytest ...` (make test does)",
            pytrace=False,
        )
    runners: list[PodRunner] = []

    def make(namespace: str | None = None, label_selector: str | None = None, **kw: object) -> PodRunner:
        kw.setdefault("backoff", Backoff(first=0.5, cap=5.0))
        kw.setdefault("probe_period_cap", 1.0)
        runner = PodRunner(control_plane.kubeconfig, workdir=tmp_path / f"pods-{len(runners)}",
                           namespace=namespace, label_selector=label_selector, **kw)  # type: ignore[arg-type]
        runners.append(runner)
        return runner.start()

    try:
        yield make
    finally:
        for r in reversed(runners):
            r.stop()


@pytest.fixture
def pod_runner(k8s_namespace: str, make_pod_runner: Callable[..., PodRunner]) -> PodRunner:
    """A pod runner for the test's namespace."""
    return make_pod_runner(namespace=k8s_namespace)
