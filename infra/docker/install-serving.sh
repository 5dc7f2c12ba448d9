#!/bin/sh
# Install modelyard's serving runtime into a new virtualenv, offline, from the folder this script
# sits in (wheels and requirements.txt, made by modelyard.package.image.flat_wheels). Used by the
# serving image's Dockerfile and by process-runtime hosts (ansible: model_service), so both hold
# the same thing: the `serve` extra's pinned distributions, each installed without its own
# dependencies (what serving never imports, such as onnxruntime's protobuf and flatbuffers,
# stays out; tests/test_image.py checks the list against what a served request imports), and
# no pip, setuptools, test suites or ONNX Runtime's model tools.
# Usage: install-serving.sh VENV [PYTHON]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=$1
python=${2:-python3}
rm -rf "$venv"  # a run cut short starts again from nothing
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --no-cache-dir --no-index --no-deps --find-links "$here" \
    --requirement "$here/requirements.txt"
"$venv/bin/pip" install --quiet --no-cache-dir --no-index --no-deps "$here"/modelyard-*.whl
"$venv/bin/pip" uninstall --quiet --yes pip setuptools 2>/dev/null || true
site=$(echo "$venv"/lib/python3*/site-packages)
rm -rf "$site/onnxruntime/tools" "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" \
    "$site/numpy/_core/tests" "$site"/numpy/*/tests "$site/numpy/tests"
touch "$venv/.installed"  # what a host's playbook checks before installing again
