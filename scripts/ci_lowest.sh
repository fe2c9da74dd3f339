#!/usr/bin/env bash
# The lowest-versions CI leg: a separate venv with every dependency at the lowest version pyproject.toml allows
# (a constraints file pins each `>=` bound), then the `-m lowest` test subset (loading, injection, a training step
# with the text encoder under gradient checkpointing, export, resume). torch stays the CPU wheel the main leg uses:
# PyPI's builds of older torch are multi-GB CUDA builds, so pyproject's torch bound is the version tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LOHA_LOWEST_VENV:-.venv-lowest}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT

# each runtime dependency's `name>=X` -> `name==X` (the test tools of the [test] extra take what resolves)
python3 - "$constraints" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["dependencies"]
pins = [f"{m[1]}=={m[2]}" for s in specs if (m := re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)", s))]
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("lowest versions:", " ".join(pins))
PY

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --constraint "$constraints" torch==2.13.0
"$venv/bin/pip" install -q --constraint "$constraints" -e ".[test]"
"$venv/bin/python" -m pip freeze | grep -i -E '^(torch|diffusers|transformers|accelerate|safetensors|datasets|huggingface.hub|numpy)==' || true
"$venv/bin/python" -m pytest -q -m lowest -p no:cacheprovider
