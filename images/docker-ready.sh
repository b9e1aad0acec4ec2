#!/usr/bin/env bash
# Make `docker` usable, idempotently: install Debian's docker.io and mmdebstrap when missing (as
# root), and start a daemon when none answers (vfs storage, no default bridge: containers run with
# host networking bound to 127.0.0.1, or none). A daemon already running is used as it is.
set -euo pipefail
log() { echo "images: $*"; }
state="${INFERGRID_CACHE:-$HOME/.cache/infergrid}/images"
mkdir -p "$state"

missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
# docker.io when no daemon answers and the client or the daemon binary is missing (a machine may have
# only a client, e.g. a static one in /usr/local/bin)
if ! docker info >/dev/null 2>&1 && ! { command -v docker && command -v dockerd; } >/dev/null; then
  missing+=(docker.io)
fi
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    log "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"; exit 1
  fi
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
  log "docker daemon answers ($(docker version --format '{{.Server.Version}}'))"; exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v dockerd >/dev/null; then
  log "no docker daemon answers and this user cannot start one: start Docker, then retry"; exit 1
fi
log "starting dockerd (vfs storage, no bridge); log in $state/dockerd.log"
nohup dockerd --storage-driver=vfs --bridge=none >"$state/dockerd.log" 2>&1 &
echo $! >"$state/dockerd.pid"
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then log "dockerd up (pid $(cat "$state/dockerd.pid"))"; exit 0; fi
  sleep 0.5
done
log "dockerd did not answer in 30 s; its log:"; tail -n 30 "$state/dockerd.log"; exit 1
