#!/usr/bin/env bash
# Build a base image equivalent to python:3.11-slim from Debian packages, for machines that
# cannot pull from a registry: debootstrap a minimal bookworm (Python 3.11) and `docker import` it.
# Usage: infra/docker/build-base.sh [TAG]   (default modelyard/base:bookworm-py311)
set -euo pipefail
TAG="${1:-modelyard/base:bookworm-py311}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG already present"
    exit 0
fi
"$(dirname "$0")/../scripts/ensure-packages.sh" debootstrap:debootstrap

ROOTFS="$(mktemp -d /tmp/modelyard-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm into $ROOTFS (a few minutes the first time)…"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log"; exit 1; }
# What python:3.11-slim also leaves out: package caches, docs, man pages, locales.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc "$ROOTFS"/usr/share/man "$ROOTFS"/usr/share/locale "$ROOTFS.log"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG"
echo "built $TAG: $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
