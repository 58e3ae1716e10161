# medseg developer commands. Each target does its own set-up on a fresh machine.
#   make demo   - install, then segment the lungs of the phantom study in sample_data/
#   make test   - install (incl. system packages), then lint, type-check and run the tests
#   make bench  - install the peers, then run every benchmark (minutes; see docs/benchmarks.md)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml .ci/system-packages.txt | cksum | cut -d' ' -f1)

.PHONY: install system-deps test lint demo bench clean

$(STAMP): pyproject.toml .ci/system-packages.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on disk; a bare 'torch' would pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

system-deps:
	bash .ci/install-system-packages.sh

lint: install
	$(BIN)/ruff check medseg tests benchmarks
	$(BIN)/mypy

test: system-deps install lint
	$(BIN)/python -m pytest

demo: install
	$(BIN)/medseg info sample_data/phantom_000/dicom
	$(BIN)/medseg segment sample_data/phantom_000/dicom -o out/phantom_000

# Speed and memory against peers (lungmask, MONAI, SimpleITK, ONNX Runtime); minutes.
# Results go to docs/benchmarks.md by hand, with the date and the machine.
bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/load_vs_sitk.py
	$(BIN)/python benchmarks/segment_vs_lungmask.py --case all
	$(BIN)/python benchmarks/segment_vs_lungmask.py --memory
	$(BIN)/python benchmarks/metrics_vs_monai.py
	$(BIN)/python benchmarks/onnx_vs_torch.py
	$(BIN)/python benchmarks/inference_batch_size.py
	$(BIN)/python benchmarks/allocator.py
	$(BIN)/python benchmarks/batch_throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
