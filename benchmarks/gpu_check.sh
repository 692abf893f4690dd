#!/usr/bin/env bash
# One prepared GPU check (<= 5 minutes on one H200): heads vs nn.Linear at C = 1000 / 21841 / 100000 in
# float32, bf16 and fp16 autocast; nccl with world size 1; float16 + GradScaler steps; a torch.compile'd
# timm resnet50 with a DisMax head vs stock (train step, eval throughput, native score vs MaxSoftmax, peak
# memory). Without CUDA it says what it skipped and exits 0. Arguments go to benchmarks/gpu_check.py
# (e.g. --smoke, --sections heads,nccl, --budget-s 285). PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
