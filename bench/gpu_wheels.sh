#!/usr/bin/env bash
# Wheels for the GPU check's machine: the Python packages nemo-dpo, its tests and the bench need that the lent GPU
# machine's image (Python 3.12, CUDA PyTorch, transformers, pytest, pyarrow, ...) lacks. That machine reaches no
# package registry, so they travel with the working tree: this script downloads them here into .whl/ (ignored by
# git through .git/info/exclude, ~18 MB), and the device command installs them there before running the check:
#
#   bash bench/gpu_wheels.sh                       # here, once
#   # there (the device tool's run, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 bench/gpu_check.py --out $OUT/gpu_check
#
# The versions are the ones the CPU suite runs with (transformers too, although the image has an older 5.x: the
# HF import/export tests compare against this one). transformer-engine is not among them (its wheels are hundreds of
# MB): without it gpu_check's te_packed says SKIP and the local layer spec runs on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    megatron-core==0.16.1 omegaconf==2.4.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    transformers==5.24.0 dockerfile-parse==2.0.1
du -sh .whl
