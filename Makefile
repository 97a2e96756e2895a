# cxr-pacs-worker: the two set-up commands are `make demo` (main job, embedded SQLite default)
# and `make test` (the whole test suite). Both create the venv themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv system-deps postgres test run demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch/torchvision pinned first so pip takes the local wheels (see README)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test,train]'
	touch $(STAMP)

# dcmtk (storescu, echoscu, dsrdump, storescp) and Orthanc are real peers used by the tests.
system-deps:
	@if ! command -v storescu >/dev/null || ! command -v dsrdump >/dev/null || ! command -v Orthanc >/dev/null; then \
	  echo "installing dcmtk and orthanc from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk orthanc >/dev/null; \
	fi
	@# the Debian package starts a system Orthanc on 4242/8042; the tests start their own
	@-service orthanc stop >/dev/null 2>&1 || true

postgres:
	@if ! pg_isready -h 127.0.0.1 -p 5432 -q; then \
	  echo "starting PostgreSQL"; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	  for i in $$(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done; \
	fi
	@pg_isready -h 127.0.0.1 -p 5432

test: venv system-deps postgres
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv
	$(PY) -m worker.demo

run: venv
	$(VENV)/bin/cxr-worker serve --config config.yaml

bench: venv system-deps
	$(PY) bench/ingest.py
	$(PY) bench/models.py
	$(PY) bench/pipeline.py

lint: venv
	$(VENV)/bin/ruff check worker dicom_node models db tests bench
	$(VENV)/bin/ruff format --check worker dicom_node models db tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var
