#!/usr/bin/env bash
# Rebuild the committed avdigits dataset at data/avdigits (about 15 s on 2 cores).
# Deterministic: the shards' sha256 come out the same on every run with the same
# espeak-ng version; only manifest.json's "created" time changes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v espeak-ng >/dev/null; then
    echo "espeak-ng not installed: apt-get install -y espeak-ng (make setup does this)" >&2
    exit 1
fi
PYTHONPATH=platform exec .venv/bin/python -m xmr.cli data avdigits --out data/avdigits --overwrite "$@"
