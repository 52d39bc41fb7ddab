#!/usr/bin/env bash
# One device call proves the project on the GPU machine (Python 3.12, torch/triton/numba/opencv, no FFCV, no
# registry) and measures it. Prepare here first:  bash bench/build_gpu_wheels.sh   (fills .whl/, git-ignored)
# Then, on the device with `.whl` carried:         bash bench/gpu_run.sh [STAGE ...]
# Stages (default: all, in this order): tests (GPU cases: kernels, GPU data path, CUDA trainer), suite (the whole
# test suite), kernels (bench_kernels.py), loader (bench_loader.py with the data.decode=gpu readers), throughput
# (bench/throughput.py grid; THROUGHPUT_ARGS overrides it), profile (bench/profile_step.py: torch.profiler tables
# and a Chrome trace of a few steps), step (bench_step.py: CO-BYOL R50 224), switches (the step's switches one by
# one: profile with all off and all on, then throughput.py over compile x fuse_views x prefetch for CO-BYOL R18 160
# and all off / all on for BYOL R18 160 and CO-BYOL R50 224; about 8 minutes on an H100), multicrop (BYOL and CO-BYOL
# R18 224 with 2+0 and 2+6 views, GPU data path; not yet run).
# Writes under $OUT (default ./gpu_out): gpu.txt and one .log (+ .json) per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_run: installing the carried wheels failed (run bench/build_gpu_wheels.sh here first)"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "cpus $(nproc)"
  python3 -c "import sys, torch, torchvision, triton, numba, numpy, cv2, ffcv; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'opencv', cv2.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
stages=("$@"); [ ${#stages[@]} = 0 ] && stages=(tests suite kernels loader throughput step)
status=0
clean() { grep -v "it/s\]\|img/s\]\|^ \|KeyError\|Traceback\|Exception ignored\|weakref\|finalizer"; }
for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%T))"
  case $stage in
    tests)  # Fashion-MNIST's Debian package is not on this image
      python3 -m pytest -q -p no:cacheprovider tests/test_local_global_cosine.py tests/test_local_info_nce.py \
        tests/test_crop.py \
        tests/test_gpu_views.py tests/test_train.py::test_trains_on_the_gpu_with_bf16_and_the_fused_ops \
        tests/test_step.py \
        2>&1 | tee "$OUT/tests.log" | tail -15; [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    suite)
      python3 -m pytest -q -p no:cacheprovider tests -k "not fashion_mnist" 2>&1 | tee "$OUT/suite.log" | tail -8
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    kernels)
      python3 bench/bench_kernels.py --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.log" ;;
    loader)
      python3 bench/bench_loader.py --images "${BENCH_IMAGES:-4000}" --workers "$(nproc)" --epochs 2 --batch 256 \
        --skip-baselines 1 --json "$OUT/bench_loader.json" 2>&1 | clean | tee "$OUT/bench_loader.log" ;;
    throughput)
      # shellcheck disable=SC2086
      python3 bench/throughput.py ${THROUGHPUT_ARGS:---images 20000 --method byol co_byol --backbone resnet18 \
        --res 160 --decode cpu gpu} --json "$OUT/throughput.json" 2>&1 | clean | tee "$OUT/throughput.log" ;;
    profile)  # where a step's time goes (PROFILE_ARGS overrides the case)
      # shellcheck disable=SC2086
      python3 bench/profile_step.py ${PROFILE_ARGS:---method co_byol --backbone resnet18 --res 160 --decode gpu} \
        --out "$OUT/profile" 2>&1 | clean | tee "$OUT/profile.log" ;;
    multicrop)  # multi-crop's cost: BYOL and CO-BYOL R18 224, 2+0 against 2+6 (96 px) views, GPU data path
      for local in 0 6; do
        python3 bench/throughput.py --images 20000 --method byol co_byol --backbone resnet18 --res 224 --decode gpu \
          --steps 30 --warmup 15 --set augment.local_views=$local augment.local_res=96 \
          --json "$OUT/multicrop_$local.json" 2>&1 | clean | tee "$OUT/multicrop_$local.log" | tail -2
      done ;;
    step)
      python3 bench/bench_step.py --method byol co_byol --backbone resnet50 --res 224 --batch 256 2>&1 \
        | tee "$OUT/bench_step.log" ;;
    switches)
      for on in 0 1; do
        python3 bench/profile_step.py --method co_byol --backbone resnet18 --res 160 --decode gpu --images 4000 \
          --compile "$on" --fuse-views "$on" --prefetch "$on" --out "$OUT/profile_$on" 2>&1 | clean \
          | tee "$OUT/profile_$on.log" | head -3
      done
      python3 bench/throughput.py --images 20000 --method co_byol --backbone resnet18 --res 160 --decode gpu \
        --compile 0 1 --fuse-views 0 1 --prefetch 0 1 --steps 30 --warmup 15 --json "$OUT/switches_r18.json" 2>&1 \
        | clean | tee "$OUT/switches_r18.log"
      for case in "byol resnet18 160" "co_byol resnet50 224"; do set -- $case
        for on in 0 1; do
          python3 bench/throughput.py --images 20000 --method "$1" --backbone "$2" --res "$3" --decode gpu \
            --compile "$on" --fuse-views "$on" --prefetch "$on" --steps 30 --warmup 15 \
            --json "$OUT/switches_$1_$2_$on.json" 2>&1 | clean | tee "$OUT/switches_$1_$2_$on.log" | tail -1
        done
      done ;;
    *) echo "gpu_run: unknown stage $stage"; status=1 ;;
  esac
done
exit $status
