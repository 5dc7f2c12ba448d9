"""Build hook: compile the serving runtime's tree-ensemble kernel (src/modelyard/serve/_forest.c).

The shared object is plain C (only libm's expf), loaded with ctypes (modelyard.serve.forest):
no Python headers are needed, only a C compiler (`cc`, or `CC`). Editable installs find it next
to the source; a wheel carries it and is tagged for this platform. Without a compiler the build
goes on without it and the server evaluates trees with ONNX Runtime alone (and says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/modelyard/serve/_forest.c")
PACKAGED = "modelyard/serve/_forest.so"


class ForestKernelHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        source = Path(self.root) / SOURCE
        target = source.with_suffix(".so")
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            print("modelyard: no C compiler (cc): the tree kernel is left out", file=sys.stderr)
            return
        # Generic -O2 code for the architecture, not -march=native: the wheel moves to other
        # machines of the same architecture (images, process-runtime hosts).
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(target), str(source), "-lm"],
            check=True,
        )
        if version != "editable":
            build_data["force_include"][str(target)] = PACKAGED
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
