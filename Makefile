# Two commands for a new user (README): `make app` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501

.PHONY: setup app test lint browser bench acceptance

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-ray.txt
	@python3 -c "import shutil; free = shutil.disk_usage('.').free / 2**30; free < 8 and print(f'warning: {free:.1f} GB free here; the environment takes about 7 GB (PyTorch and its CUDA libraries): pip may stop with No space left on device')"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-ray.txt
	touch $@

app: setup
	$(PY) -m app.serve --server.port $(PORT)

# The browser test drives Debian's Chromium; install it when missing and we may (root, apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: the browser test will be skipped (install Debian's chromium to run it)"; fi; }

lint: setup
	$(PY) -m ruff check geodesic app tests bench

test: setup browser lint
	$(PY) -m pytest -q

acceptance: setup
	bash bench/acceptance.sh artifacts/acceptance 0 1 2
