#!/usr/bin/env bash
# The checks that need a GPU, in one call of at most ~7 minutes (the timeouts below add up to 430 s; measured
# on an H100 and an H200):
#   1. the CUDA tests (pytest -m cuda): streamed basis == CPU result, snapshots of CUDA weights;
#   2. bench_optim.py --device cuda: P-SGD resident and streamed against SGD at ~134M parameters;
#   3. P-BFGS step time on the GPU (loss-only trials against backpropagating ones).
#   4. bench_record_gpu.py: training-loop overhead of snapshots of CUDA weights, async vs sync copy.
# Everything it prints goes to benchmarks/results/gpu/ (or $OUT/gpu when the device tool gives $OUT),
# with a markdown summary. On a machine without CUDA it says so and exits 0.
#
# Setup. It needs torch with CUDA, and trajstore's other dependencies importable. On a machine that reaches a
# package index, `pip install -e .` first. On one that does not (the lent GPU machines here: their image has
# torch and nothing of ours), bring wheels along in .whl/ (gitignored); the script installs them to /tmp/site
# when zarr, dask or numcodecs do not import. Build .whl/ elsewhere for the target's Python and platform, e.g.
# for CPython 3.12 on x86-64 Linux (one version of each package; pure-Python ones come as py3-none-any):
#   for pkg in zarr numcodecs donfig google-crc32c crc32c dask distributed partd locket tblib tornado zict mnist1d; do
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux1_x86_64 -d .whl "$pkg"
#   done
# and name it in the device tool's carry (carry=[".whl"], 64 MiB a call in all). Check the list against
# `pip install --dry-run --report - .` on the target when its image changes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}/gpu"
mkdir -p "$out"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
if ! python3 -c "import torch"; then
    echo "gpu_check: torch does not import here" | tee "$out/$stamp-failed.txt"
    exit 1
fi
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to check" | tee "$out/$stamp-skipped.txt"
    exit 0
fi
if ! python3 -c "import zarr, dask, distributed, numcodecs" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import zarr, dask, numcodecs, torch, trajstore, pipeline; print('zarr', zarr.__version__, 'dask', dask.__version__, 'torch', torch.__version__)" 2>&1 | tee "$out/$stamp-device.txt"; then
    echo "gpu_check: trajstore or its dependencies do not import here (see above; build .whl/ as this script's header says)" | tee -a "$out/$stamp-device.txt"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/$stamp-device.txt"
status=0
timeout 120 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_basis_dtype.py 2>&1 | tee "$out/$stamp-pytest-cuda.txt" || status=1
timeout 120 python3 benchmarks/bench_optim.py --device cuda --only psgd --steps 20 2>&1 | tee "$out/$stamp-bench-optim-psgd.txt" || status=1
timeout 90 python3 benchmarks/bench_optim.py --device cuda --only pbfgs --steps 10 2>&1 | tee "$out/$stamp-bench-optim-pbfgs.txt" || status=1
timeout 100 python3 benchmarks/bench_record_gpu.py --budget 60 --out "$out" 2>&1 | tee "$out/$stamp-bench-record-gpu.txt" || status=1
{
    echo "# GPU check $stamp"
    echo
    echo '```'; cat "$out/$stamp-device.txt"; echo '```'
    echo
    echo "## pytest -m cuda"; echo '```'; tail -n 5 "$out/$stamp-pytest-cuda.txt"; echo '```'
    echo "## bench_optim --device cuda (P-SGD)"; echo '```'; tail -n 40 "$out/$stamp-bench-optim-psgd.txt"; echo '```'
    echo "## bench_optim --device cuda (P-BFGS)"; echo '```'; tail -n 30 "$out/$stamp-bench-optim-pbfgs.txt"; echo '```'
    echo "## bench_record_gpu (snapshots of CUDA weights, issue 10)"; echo '```'; tail -n 12 "$out/$stamp-bench-record-gpu.txt"; echo '```'
} > "$out/$stamp-summary.md"
echo "gpu_check: status $status; results in $out"
exit $status
