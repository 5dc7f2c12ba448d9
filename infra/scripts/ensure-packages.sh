#!/usr/bin/env bash
# Install Debian packages the project needs if their command is missing: ensure-packages.sh CMD:PKG...
# CMD is a command name, or a path pattern for programs off the PATH (/usr/lib/postgresql/*/bin/initdb).
set -euo pipefail
missing=()
for pair in "$@"; do
    cmd="${pair%%:*}"
    if [[ "$cmd" == /* ]]; then compgen -G "$cmd" >/dev/null && continue
    else command -v "$cmd" >/dev/null && continue; fi
    missing+=("${pair##*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then echo "missing: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2; exit 1; fi
# One install at a time: `make test` makes the engine and the hosts' packages side by side.
exec 9>/run/lock/modelyard-apt.lock
flock 9
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
