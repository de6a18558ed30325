#!/usr/bin/env bash
# Set up everything xmr needs on a fresh Debian machine: optional Debian packages,
# a virtualenv in .venv with pinned packages, and the project installed editable.
# Safe to re-run: the pip step is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng only builds the avdigits dataset; the built shards are committed, so a machine
# without apt (or without root) still runs everything else.
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing espeak-ng (Debian) for the avdigits builder"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
    || echo "[setup] espeak-ng install failed; the avdigits build test will be skipped"
fi

# hey (an HTTP load generator) only drives bench/serve_load.py: `make bench` asks for it.
if [ "${XMR_SETUP_BENCH:-0}" = 1 ] && ! command -v hey >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing hey (Debian) for bench/serve_load.py"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey >/dev/null) \
      || echo "[setup] hey install failed; bench/serve_load.py will say so"
  else
    echo "[setup] bench/serve_load.py needs hey: apt-get install hey (as root)"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.xmr-installed
want=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages into .venv (torch 2.13.0 CPU build from local disk when available)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[test,text]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import xmr, torch, ray, webdataset, boto3, optuna, sentence_transformers" \
    || { echo "[setup] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# openapi-python-client (tests/test_openapi.py's generated client) pins a typer that transformers
# cannot share: a venv of its own inside .venv, re-made when requirements/codegen.txt changes.
codegen_stamp=.venv/codegen/.xmr-installed
codegen_want=$(sha256sum requirements/codegen.txt | cut -d' ' -f1)
if [ "$(cat "$codegen_stamp" 2>/dev/null)" != "$codegen_want" ]; then
  echo "[setup] installing openapi-python-client into .venv/codegen"
  [ -x .venv/codegen/bin/python ] || "$PY" -m venv .venv/codegen
  .venv/codegen/bin/python -m pip install -q -r requirements/codegen.txt 2>&1 | grep -v "is ignored" || true
  .venv/codegen/bin/openapi-python-client --version >/dev/null \
    || { echo "[setup] openapi-python-client install failed" >&2; exit 1; }
  echo "$codegen_want" > "$codegen_stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")')"
