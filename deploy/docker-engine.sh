#!/usr/bin/env bash
# Prepare a Docker engine on a fresh Debian machine without a reachable image registry (CI, an
# air-gapped lab): install Debian's docker.io + docker-compose (v1), start dockerd, and build once a
# stand-in for `python:3.11-slim` from Debian's own archive (debootstrap -> docker import), so the
# project's Dockerfile builds unchanged. Idempotent: what is already there is kept.
#
# With real Docker and a registry you need none of this: `docker compose up --build` pulls
# python:3.11-slim itself (docs/deployment.md).
#
#   sudo deploy/docker-engine.sh            # engine + base image
#   CROSSPROBE_BASE=python:3.11-slim        # the tag the stand-in gets (the Dockerfile's default)
set -euo pipefail
BASE="${CROSSPROBE_BASE:-python:3.11-slim}"
CACHE="${CROSSPROBE_ENGINE_CACHE:-/var/cache/crossprobe-engine}"
say() { echo "[docker-engine] $*" >&2; }

need_root() { [ "$(id -u)" = 0 ] || { say "run as root (installs packages, starts dockerd)"; exit 1; }; }

install_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return
  need_root
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

start_dockerd() {
  docker info >/dev/null 2>&1 && return
  need_root
  say "starting dockerd (log: /var/log/crossprobe-dockerd.log)"
  nohup dockerd >/var/log/crossprobe-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  say "dockerd did not come up; see /var/log/crossprobe-dockerd.log"; exit 1
}

debian_mirror() {  # the mirror apt already uses (deb822 or one-line sources)
  local uri
  uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  docker image inspect "$BASE" >/dev/null 2>&1 && { say "$BASE: present"; return; }
  need_root
  local rootfs="$CACHE/rootfs" mirror
  mirror=$(debian_mirror)
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    say "debootstrap bookworm from $mirror (a few minutes, once)"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
      bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || { say "debootstrap failed: $CACHE/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  fi
  tar -C "$rootfs" -c . | docker import - crossprobe/debian-python:bookworm >/dev/null
  # /usr/local becomes a venv: `python` and `pip` on PATH, as in the official python images
  printf 'FROM crossprobe/debian-python:bookworm\nRUN python3 -m venv /usr/local\n' \
    | DOCKER_BUILDKIT=0 docker build -q -t "$BASE" - >/dev/null
  say "$BASE: built from Debian bookworm ($(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

install_packages
start_dockerd
build_base
