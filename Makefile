# Two commands on a fresh machine (see README):
#   make demo   install, build the offline default artifacts, run the scripted demo end to end
#               (word -> prompt -> picture -> object -> mask -> edit; files under runs/)
#   make test   install, run the test suite (the browser tests need Debian's chromium: setup installs it)
#   make check  build the default (tiny) artifacts, check them against their recipes' budgets (CI runs it after test)
#   make web    install, build the default artifacts, serve the demo page on http://127.0.0.1:7860
VENV ?= .venv
PY := $(VENV)/bin/python
WORD ?= star
EDIT ?= make it green
PICK ?= 1

.PHONY: setup browser web demo build test check bench-medium bench-sam-base bench-sd-random clean

# root runs apt-get itself, anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(VENV)/.installed browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[build,test,clients,web]"
	touch $@

# Headless Chromium and its driver for tests/test_web.py, from Debian's packages (never a downloaded browser).
# Installed where missing; when that is impossible make stops here, loudly (the tests would fail anyway).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	echo "make browser: installing chromium and chromium-driver (apt-get)"; \
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver || { \
	  echo "make browser: FAILED to install chromium + chromium-driver; the browser tests (tests/test_web.py)" \
	       "need /usr/bin/chromium and /usr/bin/chromedriver: install them and run make again" >&2; exit 1; }; \
	[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { \
	  echo "make browser: apt-get ran but /usr/bin/chromium or /usr/bin/chromedriver is still missing" >&2; exit 1; }

build: setup
	$(VENV)/bin/doit build

demo: build
	$(VENV)/bin/onnxforge demo --word "$(WORD)" --pick $(PICK) --edit "$(EDIT)" --seed 0 --out runs

web: build
	$(VENV)/bin/onnxforge web

test: setup
	$(VENV)/bin/pytest -q

check: build
	$(VENV)/bin/doit check

# By hand, not in CI: gpt2-medium architecture with random weights (~6 GB; ~11 min build, ~40 min bench on 2 cores).
bench-medium: setup
	$(VENV)/bin/doit build recipes=gpt2-medium-random
	$(VENV)/bin/onnxforge bench --recipe gpt2-medium-random --out docs/benchmarks/gpt2-medium-random

# By hand, not in CI: sam-vit-base architecture with random weights.
bench-sam-base: setup
	$(VENV)/bin/doit build recipes=sam-vit-base-random
	$(VENV)/bin/onnxforge bench --recipe sam-vit-base-random --runs 5 --prompts 20 --points-per-side 16 \
		--image 1024x768 --out docs/benchmarks/sam-vit-base-random

# By hand, not in CI: SD v1.4 architecture with random weights (calibration included; ~23 min build, ~27 min bench on the AVX2 EPYC).
bench-sd-random: setup
	$(VENV)/bin/doit build recipes=sd-v1-4-random
	$(VENV)/bin/onnxforge bench --recipe sd-v1-4-random --sizes 256,512 --runs 3 --warmup 1 \
		--image-size 512 --image-steps 25 --low-memory --out docs/benchmarks/sd-v1-4-random

clean:
	rm -rf artifacts
