#!/usr/bin/env bash
# `modtag bench` on an NVIDIA GPU, from a bare machine, in one command (`make bench-gpu` runs it):
# a venv with a CUDA build of torch and modtag, a check that torch sees the card, then the bench at the
# card's fast dtype (bf16 on Ampere and newer) with the vision stage's share of the card's bf16 peak.
#
#   deploy/gpu/bench-gpu.sh                 # random-base weights (built here, nothing downloaded but wheels)
#   MODELS=base deploy/gpu/bench-gpu.sh     # the real BLIP base weights (downloaded from the model hub)
#
# Settings (environment): PYTHON (python3.11 or newer), VENV (.modtag/venv-gpu), TORCH_SPEC (torch==2.13.0, as the
# Makefile), TORCH_INDEX_URL (https://download.pytorch.org/whl/cu128: CUDA 12.8 wheels, any recent driver;
# cu126 for an older one), MODELS (random-base), BATCH_SIZE (8), OUT (.modtag/bench-gpu.json). An offline machine:
# point TORCH_INDEX_URL and pip's own PIP_INDEX_URL / PIP_FIND_LINKS at a local wheel folder.
# Exit status: 0 the bench ran (the report in $OUT, its table on stdout); 2 no NVIDIA driver or GPU;
# 3 torch installed but CUDA unusable from it (the wrong wheel for the driver); 4 setting up the venv failed;
# otherwise the bench's own (3: an error it names in one line).
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.modtag/venv-gpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
MODELS=${MODELS:-random-base}
BATCH_SIZE=${BATCH_SIZE:-8}
OUT=${OUT:-.modtag/bench-gpu.json}

say() { printf 'bench-gpu: %s\n' "$*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2; then
    say "no NVIDIA driver or GPU here (nvidia-smi fails): this runs on a machine with one [gpu_missing]"
    exit 2
fi

mkdir -p "$(dirname "$VENV")" "$(dirname "$OUT")"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV" || { say "cannot create $VENV with $PYTHON [venv_failed]"; exit 4; }
fi
say "installing $TORCH_SPEC from $TORCH_INDEX_URL, then modtag with the locked versions"
"$VENV/bin/python" -m pip install --quiet --upgrade pip || { say "pip cannot upgrade itself [venv_failed]"; exit 4; }
"$VENV/bin/python" -m pip install --quiet --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" \
    || { say "cannot install $TORCH_SPEC from $TORCH_INDEX_URL [venv_failed]"; exit 4; }
# worker: the models; test: scikit-image, whose photos the bench runs on (and the CUDA tests, if wanted).
"$VENV/bin/python" -m pip install --quiet -c requirements.lock -e ".[worker,test]" \
    || { say "cannot install modtag into $VENV [venv_failed]"; exit 4; }

# The check runs in a fresh process of its own: the bench's process initialises CUDA itself.
if ! "$VENV/bin/python" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    print(f"bench-gpu: torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPU: "
          "pick the TORCH_INDEX_URL that matches the driver [cuda_unavailable]", file=sys.stderr)
    sys.exit(3)
name = torch.cuda.get_device_name(0)
print(f"bench-gpu: torch {torch.__version__}, CUDA {torch.version.cuda}, {name}, "
      f"bf16 {torch.cuda.is_bf16_supported()}", file=sys.stderr)
PY
then
    exit 3
fi

say "running modtag bench --device cuda --json (report: $OUT)"
"$VENV/bin/modtag" bench --device cuda --json --models "$MODELS" --batch-size "$BATCH_SIZE" --baseline-images 2 \
    --repeat 3 --peers --no-progress >"$OUT"
# The report's table, as `modtag bench` without --json prints it.
"$VENV/bin/python" -c 'import json, sys; from modtag.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))' "$OUT"
say "the JSON report is in $OUT"
