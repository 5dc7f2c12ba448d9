"""`python -m modelyard.serve BUNDLE`: the serving image's entrypoint (no CLI dependencies)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from modelyard.serve.server import ServeConfig, serve


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m modelyard.serve BUNDLE_FOLDER", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return serve(ServeConfig.from_env(Path(argv[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
