#!/usr/bin/env bash
# Fresh machine -> a tiny end-to-end training run on generated data (CPU, a few minutes at most).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements-ci.txt
pip install -q --no-deps -e .
megafusion train --config tiny "$@"
