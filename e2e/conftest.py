"""Shared pytest setup: the test-bed fixtures (control_plane, k8s_namespace, pod_runner, make_pod_runner)."""

pytest_plugins = ["infergrid.testbed.pytest_plugin"]
