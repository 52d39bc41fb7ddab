#!/usr/bin/env bash
# One device call proves the project on the GPU machine (Python 3.12, torch/triton/numba/opencv, no FFCV, no
# registry) and measures it. Prepare here first:  bash bench/build_gpu_wheels.sh   (fills .whl/, git-ignored)
# Then run on the device with `.whl` carried:      bash bench/gpu_run.sh
# Writes under $OUT (default ./gpu_out): gpu.txt, pytest.log, bench_loader.log/.json, bench_gpu_decode.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_run: installing the carried wheels failed (run bench/build_gpu_wheels.sh here first)"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import sys, torch, torchvision, triton, numba, numpy, cv2, ffcv; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'opencv', cv2.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
status=0
# The whole suite (CPU tests too: they prove FFCV works here). Fashion-MNIST's Debian package is not on this image.
python3 -m pytest -q -p no:cacheprovider tests -k "not fashion_mnist" 2>&1 | tee "$OUT/pytest.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1
for w in "$(nproc)" 4; do python3 bench/bench_loader.py --images "${BENCH_IMAGES:-4000}" --workers "$w" --epochs 3 \
  --json "$OUT/bench_loader_w$w.json" 2>&1 | grep -v "it/s\|img/s]" | grep -v "^ \|KeyError\|Traceback\|Exception ignored" \
  | tee "$OUT/bench_loader_w$w.log"; done
python3 bench/bench_gpu_decode.py --tree "bench/_data/jpegs_${BENCH_IMAGES:-4000}" 2>&1 | tee "$OUT/bench_gpu_decode.log"
exit $status
