#!/usr/bin/env bash
# Make sure a Docker engine answers. Uses a running one if there is one; otherwise installs
# Debian's docker.io (as root) and starts dockerd the way this project needs it on machines
# without a bridge network: no bridge, no iptables; containers use --network host.
# Prints the DOCKER_HOST to use.
set -euo pipefail
SOCK="${MODELYARD_DOCKER_SOCK:-/run/modelyard-docker.sock}"

if docker info >/dev/null 2>&1; then echo "${DOCKER_HOST:-unix:///var/run/docker.sock}"; exit 0; fi
if DOCKER_HOST="unix://$SOCK" docker info >/dev/null 2>&1; then echo "unix://$SOCK"; exit 0; fi

"$(dirname "$0")/ensure-packages.sh" dockerd:docker.io >&2
[ "$(id -u)" = 0 ] || { echo "start dockerd as root, or add yourself to the docker group" >&2; exit 1; }
DATA="${MODELYARD_DOCKER_DATA:-/var/lib/modelyard-docker}"
mkdir -p "$DATA"
nohup dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
    --data-root "$DATA/data" --exec-root "$DATA/exec" --pidfile "$DATA/dockerd.pid" \
    -H "unix://$SOCK" >"$DATA/dockerd.log" 2>&1 &
for _ in $(seq 60); do
    if DOCKER_HOST="unix://$SOCK" docker info >/dev/null 2>&1; then echo "unix://$SOCK"; exit 0; fi
    sleep 1
done
echo "dockerd did not start; see $DATA/dockerd.log" >&2
tail -20 "$DATA/dockerd.log" >&2
exit 1
