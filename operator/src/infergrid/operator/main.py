"""`infergrid-operator`: runs the kopf operator with peering, a /metrics port and a liveness endpoint."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import random
import sys
from collections.abc import Sequence

import kopf

from infergrid.operator import metrics
from infergrid.operator.config import OperatorConfig
from infergrid.operator.kube import KubeClient
from infergrid.operator.preflight import check_cluster
from infergrid.operator.runtime import Runtime

DEFAULT_PEERING = "infergrid"


def _default_priority() -> int:
    # NOTE: kopf pauses *every* operator that sees a live peer of equal priority, so replicas of one
    # Deployment must not share a priority; a random one makes the highest live replica the active one.
    value = os.environ.get("INFERGRID_PRIORITY")
    return int(value) if value else random.randint(1, 2**31 - 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infergrid-operator",
                                     description="Reconcile InferenceServices into GPU worker pods and Services.")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable; glob patterns allowed); default: all")
    parser.add_argument("--peering", default=os.environ.get("INFERGRID_PEERING", DEFAULT_PEERING),
                        help="ClusterKopfPeering object for high availability (default: %(default)s)")
    parser.add_argument("--standalone", action="store_true", help="run without peering (one replica only)")
    parser.add_argument("--priority", type=int, default=_default_priority(),
                        help="peering priority; the highest-priority live replica is the active one "
                             "(default: $INFERGRID_PRIORITY, else random so that replicas never tie)")
    parser.add_argument("--peering-lifetime", type=int, default=30,
                        help="seconds before a silent peer counts as dead (the fail-over time)")
    parser.add_argument("--bind", default=os.environ.get("INFERGRID_BIND", "0.0.0.0"),
                        help="address of the metrics and health servers")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("INFERGRID_METRICS_PORT", "8080")),
                        help="Prometheus /metrics port (0 disables)")
    parser.add_argument("--health-port", type=int, default=int(os.environ.get("INFERGRID_HEALTH_PORT", "8081")),
                        help="liveness endpoint port, path /healthz (0 disables)")
    parser.add_argument("--worker-image", help="default worker image (or INFERGRID_WORKER_IMAGE)")
    parser.add_argument("--kubeconfig", help="kubeconfig path (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `infergrid-operator` command."""
    args = parse_args(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's own login reads it too
    config = OperatorConfig.from_env()
    if args.worker_image:
        config = dataclasses.replace(config, worker_image=args.worker_image)

    peering = None if args.standalone else args.peering
    problems = asyncio.run(check_cluster(args.kubeconfig, peering=peering, namespaces=args.namespace))
    if problems:
        for problem in problems:
            print(f"infergrid-operator: {problem}", file=sys.stderr)
        return 2

    import infergrid.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, quiet=args.quiet, log_format=kopf.LogFormat[args.log_format.upper()])
    if not args.verbose:
        # kopf logs every handled watch event at INFO ("Handler 'track_pod' succeeded."): too much per pod.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if peering is None:
        logging.getLogger(__name__).warning("running standalone (--standalone): start only one replica")
    if args.metrics_port:
        metrics.serve(args.metrics_port, addr=args.bind)
    runtime = Runtime(api=KubeClient.from_environment(args.kubeconfig), config=config,
                      peering_lifetime=args.peering_lifetime,
                      peering=None if args.standalone else args.peering, priority=args.priority,
                      clusterwide=not args.namespace)
    liveness = f"http://{args.bind}:{args.health_port}/healthz" if args.health_port else None
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=peering,
        priority=args.priority,
        liveness_endpoint=liveness,
        memo=kopf.Memo(runtime=runtime),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
