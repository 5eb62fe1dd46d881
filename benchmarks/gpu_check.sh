#!/usr/bin/env bash
# The GPU checks in one command on a lent device machine (what they measure: gpu_check.py).
#
# The device machine has PyTorch, OpenCV, pyarrow, timm, scipy and the rest, but neither
# pycocotools nor webdataset, and nothing can be fetched there: their Python 3.12 wheels travel
# in .whl/ (git-ignored: add "/.whl/" to .git/info/exclude), made here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pycocotools==2.0.11 webdataset==1.0.2 braceexpand==0.1.7
# then: device run, command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540.
# The report comes back as $OUT/gpu_check.txt (and the whole log as $OUT/gpu_check.log).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import pycocotools, webdataset" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
