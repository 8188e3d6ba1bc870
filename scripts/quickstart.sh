#!/usr/bin/env bash
# Fresh machine -> the embedded default end to end: install (CPU), then `megafusion demo` (a procedural corpus,
# tokenizer, preprocessing, training, generation and mini-GenEval scores; about 15 minutes on 2 CPU cores).
# Arguments go to `megafusion demo` (e.g. --minutes 8, --out out/demo, --compare-weighting).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements-ci.txt
pip install -q --no-deps -e .
megafusion demo "$@"
