# Two commands on a fresh machine: `make run` (the app, offline default) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PORT ?= 8501
# The pinned CPU build of torch (torchvision cannot sit beside it); no package may replace it.
CHECK_CPU_TORCH = $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.__version__.endswith('+cpu') else \
	'torch ' + torch.__version__ + ' replaced the pinned CPU build: see requirements.txt')"

.PHONY: setup run test lint bench chromium

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps --editable .
	$(CHECK_CPU_TORCH)
	touch $@

setup: $(VENV)/.installed

# Ray only for `evaluate.py --engine ray` and its tests: the app runs without it.
$(VENV)/.ray-installed: $(VENV)/.installed requirements-ray.txt
	$(PYTHON) -m pip install --quiet -r requirements-ray.txt
	$(CHECK_CPU_TORCH)
	touch $@

run: setup
	$(VENV)/bin/streamlit run app.py --server.port $(PORT)

# The browser test drives Debian's Chromium (a test tool's own browser download cannot work here).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

test: setup $(VENV)/.ray-installed chromium
	$(PYTHON) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PYTHON) bench/speed.py --json bench/results/speed.json
