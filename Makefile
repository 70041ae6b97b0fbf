# Two entry points for a fresh machine: `make demo` and `make test`. Each creates ./.venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Spinning OpenMP threads make torch 3-35x slower whenever anything else uses the CPU.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test setup clean packaging

$(BIN)/.kprism-installed: KPrismCore/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so the range in pyproject.toml is already met by this wheel: an unpinned
	# torch (or monai into a venv without torch) pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e "KPrismCore[train,eval,test]"
	touch $@

setup: $(BIN)/.kprism-installed

demo: setup
	$(BIN)/kprism demo --out kprism-demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# Rewrite the files derived from KPrismCore/pyproject.toml and KPrism.json (Resources/requirements.txt,
# the catalog URLs in CMakeLists.txt, KPrismSlicer.s4ext); Testing/test_slicer_install.py fails until they agree.
packaging:
	$(PYTHON) Utilities/sync_packaging.py  # Python 3.11+ (tomllib)
	$(PYTHON) Utilities/slicer_api.py

clean:
	rm -rf $(VENV) kprism-demo
