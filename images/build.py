"""Build the infergrid container images (`make images`), skipping a build whose inputs are unchanged.

    python images/build.py [--base-image IMAGE] [--wheels host|index] [worker] [operator]

Each image is tagged ``REPO:VERSION`` (VERSION = the chart's appVersion) and labelled with a hash
of its build inputs (Dockerfile, package sources, base image id, pinned torch, version); when an
image with that tag and hash is present the build is skipped. Standard library only: it runs
before anything else is installed.

* ``--base-image local`` (the default) makes a Debian bookworm base with ``mmdebstrap`` and
  ``docker import``s it once (no registry needed); any other value is used as is, e.g.
  ``python:3.11-slim``, the Dockerfiles' own default.
* ``--wheels host`` (the default) downloads the wheels with pip on the host (cached under
  ``~/.cache/infergrid/images/wheels``) and serves them to the build on 127.0.0.1 (the build
  runs with host networking; pip in a container need not reach or trust any index);
  ``--wheels index`` lets pip inside the build use PyPI.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("INFERGRID_CACHE", Path.home() / ".cache" / "infergrid")) / "images"
LOCAL_BASE = "infergrid-base:bookworm"
HASH_LABEL = "dev.infergrid.inputs-hash"
IMAGES = {  # name -> (its package directory, image repository); the build context is the repo root
    "worker": (ROOT / "worker", os.environ.get("WORKER_IMAGE", "ghcr.io/infergrid/worker")),
    "operator": (ROOT / "operator", os.environ.get("OPERATOR_IMAGE", "ghcr.io/infergrid/operator")),
}
# What both packages depend on (the prefix block hashes), installed from the same build context.
COMMON = ROOT / "common"
# Build tools pip needs to build our own packages from source without an index.
BUILD_REQUIREMENTS = ["setuptools>=68", "wheel"]


def log(message: str) -> None:
    print(f"images: {message}", flush=True)


def chart_version() -> str:
    """The chart's appVersion: the one version string of both images."""
    text = (ROOT / "charts" / "infergrid" / "Chart.yaml").read_text()
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?', text, re.M)
    if not match:
        raise SystemExit("images: charts/infergrid/Chart.yaml has no appVersion")
    return match.group(1)


def docker(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], check=check, text=True,
                          capture_output=capture)


def image_label(ref: str, label: str) -> str | None:
    result = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', ref,
                    check=False, capture=True)
    return result.stdout.strip() if result.returncode == 0 else None


def image_id(ref: str) -> str | None:
    result = docker("image", "inspect", "--format", "{{.Id}}", ref, check=False, capture=True)
    return result.stdout.strip() if result.returncode == 0 else None


def image_size(ref: str) -> str:
    result = docker("image", "inspect", "--format", "{{.Size}}", ref, capture=True)
    return f"{int(result.stdout.strip()) / 1e9:.2f} GB"


def git_revision() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def ensure_local_base() -> str:
    """`infergrid-base:bookworm`: Debian minbase + python3 + venv, from Debian's packages (~50 s, once)."""
    if image_id(LOCAL_BASE):
        log(f"base {LOCAL_BASE} present")
        return LOCAL_BASE
    if not shutil.which("mmdebstrap"):
        raise SystemExit("images: mmdebstrap is missing (apt-get install mmdebstrap; `make images` does it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "base-bookworm.tar"
    started = time.monotonic()
    if not tarball.exists():
        log("making the Debian bookworm base with mmdebstrap")
        partial = tarball.with_suffix(".partial")
        # (--format: without it the target's name decides, and one not ending in .tar makes a directory)
        subprocess.run(["mmdebstrap", "--quiet", "--format=tar", "--variant=minbase",
                        "--include=python3,python3-venv", "bookworm", str(partial)], check=True)
        partial.rename(tarball)
    docker("import", "--change", "CMD [\"python3\"]", str(tarball), LOCAL_BASE, capture=True)
    log(f"base {LOCAL_BASE} imported in {time.monotonic() - started:.0f} s")
    return LOCAL_BASE


def input_hash(name: str, base_id: str, version: str, torch_spec: str, wheels: str) -> str:
    """sha256 over everything that changes the image: Dockerfile, sources, base, pins, version."""
    context, _ = IMAGES[name]
    digest = hashlib.sha256()
    for item in (base_id, version, torch_spec if name == "worker" else "", wheels):
        digest.update(item.encode() + b"\0")
    for path in sorted([*context.rglob("*"), *COMMON.rglob("*"), ROOT / ".dockerignore"]):
        rel = path.relative_to(ROOT)
        if path.is_dir() or "__pycache__" in rel.parts or any(part.endswith(".egg-info") for part in rel.parts):
            continue
        digest.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def download_wheels(name: str, torch_spec: str) -> Path:
    """pip download of the package's dependencies on the host (skipped when the pins are unchanged)."""
    context, _ = IMAGES[name]
    pins = [str(COMMON), str(context), *BUILD_REQUIREMENTS, *([torch_spec] if name == "worker" else [])]
    key = hashlib.sha256(("\0".join(pins[2:]) + (context / "pyproject.toml").read_text()
                          + (COMMON / "pyproject.toml").read_text()).encode()).hexdigest()[:12]
    target = CACHE / "wheels" / name
    stamp = target / f".complete-{key}"
    if stamp.exists():
        log(f"{name}: wheels cached in {target}")
        return target
    target.mkdir(parents=True, exist_ok=True)
    log(f"{name}: downloading wheels into {target}")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(target),
                    *pins], check=True)
    for old in target.glob(".complete-*"):
        old.unlink()
    stamp.touch()
    log(f"{name}: wheels downloaded in {time.monotonic() - started:.0f} s")
    return target


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP directory listing on 127.0.0.1 (pip's --find-links reads it); yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@functools.cache
def builder() -> tuple[list[str], dict[str, str]]:
    """BuildKit where this machine has it (the buildx plugin, or a docker client older than 23, which
    has it built in: Debian's docker.io), else the classic builder.

    NOTE: on storage drivers without layer sharing (vfs) the classic builder copies the whole image
    filesystem for every instruction, metadata ones included: minutes per build; BuildKit does not.
    """
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return ["docker", "buildx", "build", "--load", "--progress", "plain"], {}
    clients = [shutil.which("docker"), "/usr/bin/docker"]
    for client in dict.fromkeys(c for c in clients if c and os.access(c, os.X_OK)):
        version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], capture_output=True,
                                 text=True).stdout.strip()
        if version and version.split(".")[0].isdigit() and int(version.split(".")[0]) < 23:
            return [client, "build", "--progress", "plain"], {"DOCKER_BUILDKIT": "1"}
    log("no BuildKit client here (no buildx plugin): the classic builder is slow on vfs")
    return ["docker", "build"], {"DOCKER_BUILDKIT": "0"}


def build(name: str, base: str, wheels: str, torch_spec: str, force: bool) -> None:
    context, repository = IMAGES[name]
    version = chart_version()
    ref = f"{repository}:{version}"
    base_id = image_id(base)
    if base_id is None and base != LOCAL_BASE:
        log(f"base {base} is not present locally; docker will pull it")
        base_id = base
    digest = input_hash(name, base_id or base, version, torch_spec, wheels)
    if not force and image_label(ref, HASH_LABEL) == digest:
        log(f"{name}: reusing {ref} (inputs unchanged, hash {digest}, {image_size(ref)})")
        return
    args = ["build", "--network", "host", "-t", ref, "--build-arg", f"INPUTS_HASH={digest}",
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"VERSION={version}",
            "--build-arg", f"REVISION={git_revision()}"]
    if name == "worker":
        args += ["--build-arg", f"TORCH_SPEC={torch_spec}"]
    started = time.monotonic()
    log(f"{name}: building {ref} from {base} (inputs hash {digest})")
    with contextlib.ExitStack() as stack:
        if wheels == "host":
            url = stack.enter_context(serve_directory(download_wheels(name, torch_spec)))
            args += ["--build-arg", f"WHEELS_URL={url}"]
        command, env = builder()
        subprocess.run([*command, *args[1:], "-f", str(context / "Dockerfile"), str(ROOT)], check=True,
                       env={**os.environ, **env},
                       stdout=subprocess.DEVNULL)
    log(f"{name}: built {ref} in {time.monotonic() - started:.0f} s ({image_size(ref)})")
    docker("image", "prune", "-f", capture=True)  # the previous build's image, now untagged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"images to build (default: all of {', '.join(IMAGES)})")
    parser.add_argument("--base-image", default=os.environ.get("BASE_IMAGE") or "local",
                        help="'local' (a Debian base made with mmdebstrap) or an image, e.g. python:3.11-slim")
    parser.add_argument("--wheels", choices=["host", "index"], default="host")
    parser.add_argument("--torch", default=os.environ.get("TORCH_SPEC", "torch==2.11.0"),
                        help="torch requirement of the worker image (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="build even when the inputs are unchanged")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(IMAGES)
    if unknown:
        parser.error(f"unknown image(s) {sorted(unknown)}; known: {sorted(IMAGES)}")
    base = ensure_local_base() if args.base_image == "local" else args.base_image
    for name in args.names or list(IMAGES):
        build(name, base, args.wheels, args.torch, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
