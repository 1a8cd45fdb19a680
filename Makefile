# Quick start: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench compat compat-torch lock clean

# No pip cache: the wheels (torch, triton) would otherwise sit on disk twice, and a CI
# machine's disk can be nearly full.
PIP := $(BIN)/pip install -q --no-cache-dir

$(STAMP): requirements-dev.txt constraints-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements-dev.txt -c constraints-dev.txt
	$(PIP) --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m corda_kernels demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check corda_kernels tests bench examples
	$(BIN)/ruff format --check corda_kernels tests bench examples

bench: $(STAMP)
	$(BIN)/python bench/bench_collect.py
	$(BIN)/python bench/bench_ops.py

# The suite against other transformers releases than the dev set's, one venv each (not run by CI).
COMPAT ?= 4.57.6 5.17.0
compat:
	@for v in $(COMPAT); do \
		env=.venv-transformers-$$v; \
		test -x $$env/bin/python || $(PY) -m venv $$env; \
		$$env/bin/pip install -q -r requirements-dev.txt transformers==$$v && \
		$$env/bin/pip install -q --no-deps -e . && \
		$$env/bin/python -m pytest -q --deselect tests/test_aot_compile.py || exit 1; \
	done

# The suite on other torch/triton pairs (PyPI's CUDA builds, ~3 GB per venv; they run on the CPU).
# Default: the lent GPU image's set, the oldest supported pair, and the newest Triton on the dev torch.
# Entries are torch:triton:transformers. numpy<2.4: Triton 3.6's interpreter breaks on numpy 2.4.
TORCH_COMPAT ?= 2.11.0:3.6.0:5.17.0 2.6.0:3.2.0:5.24.0 2.13.0:3.9.0:5.24.0
compat-torch:
	@for set in $(TORCH_COMPAT); do \
		case $$set in *:*:*) ;; *) echo "TORCH_COMPAT entries are torch:triton:transformers, got $$set"; exit 1 ;; esac; \
		t=$${set%%:*}; rest=$${set#*:}; tr=$${rest%%:*}; tf=$${rest#*:}; \
		env=.venv-torch-$$t; \
		test -x $$env/bin/python || $(PY) -m venv $$env; \
		grep -v -e '^torch==' -e '^triton==' -e '^transformers' requirements-dev.txt > $$env/requirements.txt; \
		$$env/bin/pip install -q --no-cache-dir -r $$env/requirements.txt torch==$$t triton==$$tr \
			transformers==$$tf 'numpy<2.4' && \
		$$env/bin/pip install -q --no-deps -e . && \
		$$env/bin/python -m pytest -q || exit 1; \
	done

# Rewrite constraints-dev.txt from .venv after upgrading it on purpose (then run make test).
# The CPU wheel's local tag is dropped so that the pin also reads on other indexes.
lock: $(STAMP)
	{ sed -n '1,3p' constraints-dev.txt; $(BIN)/pip freeze --exclude-editable | grep -v -e '^#' -e '^corda' \
		| sed 's/^\(torch==[^+]*\)+.*/\1/'; } > constraints-dev.txt.tmp
	mv constraints-dev.txt.tmp constraints-dev.txt

clean:
	rm -rf $(VENV) .venv-transformers-* .venv-torch-* build *.egg-info .pytest_cache
