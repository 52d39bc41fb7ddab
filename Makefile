# The two commands: `make demo` (set up, write the embedded Fashion-MNIST betons, train the CPU demo)
# and `make test` (set up, run the test suite). Both run `make setup` first; a no-op setup takes seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config dataset-fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed-requirements

.PHONY: setup apt test demo betons bench clean-betons parity-setup parity

setup: apt $(STAMP)

# Debian packages: FFCV compiles against libjpeg-turbo and OpenCV; the embedded data is Fashion-MNIST.
apt:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  echo "setup: installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); }

# The venv is (re)installed only when requirements.txt changes.
$(STAMP): requirements.txt
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@$(PY) -c "import ffcv, torch, torchvision, fastargs, numba; print('setup: ok, torch', torch.__version__)"
	@touch $(STAMP)

# The suite runs oneDNN's and ATen's AVX2 kernels on any x86-64 CPU (both honour these variables; a test checks),
# so an AVX-512 machine also exercises the paths of AVX2-only CPUs such as AMD Zen 3.
CPU_ISA_ENV := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2

# Two pytest-xdist workers: most of the suite is single-threaded Python (imports, Triton's interpreter, FFCV's
# readers), so the two cores of a CI machine run it side by side (docs/platforms.md has the times).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: setup
	$(CPU_ISA_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) tests

# The demo's betons: Fashion-MNIST at its native 28 px (configs/demo.yaml; configs/fmnist.yaml writes 32 px ones).
betons: setup
	@for split in train val; do \
	  if [ -f betons/fmnist28_$$split.beton ]; then echo "betons/fmnist28_$$split.beton exists"; \
	  else $(PY) write_ffcv.py --split $$split --config configs/demo.yaml || exit 1; fi; done

demo: betons
	$(PY) train_coss.py --config configs/demo.yaml --demo

bench: setup
	$(PY) bench/bench_loader.py

# Optional: the parity harness's reference (lightly, pinned, --no-deps so torch and numpy stay as requirements.txt
# has them), then BYOL against it at 2 seeds (bench/parity.py; about 45 minutes on a 2-core CPU), into
# runs/parity/byol (the committed runs: reports/parity/byol).
parity-setup: setup
	$(PY) -m pip install -q --no-deps -r requirements-parity.txt
	@$(PY) -c "import lightly.loss, lightly.models.modules, lightly.transforms; print('parity-setup: ok, lightly', lightly.__version__)"

parity: parity-setup
	@for split in train val; do [ -f betons/fmnist_$$split.beton ] || $(PY) write_ffcv.py --split $$split --config configs/fmnist.yaml || exit 1; done
	$(PY) bench/parity.py --method byol --seeds 0 1 --steps 300 --eval-every 100 --out runs/parity/byol

clean-betons:
	rm -f betons/fmnist28_train.beton betons/fmnist28_val.beton betons/fmnist_train.beton betons/fmnist_val.beton
