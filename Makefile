# cxr-pacs-worker: the two set-up commands are `make demo` (main job, embedded SQLite default)
# and `make test` (the whole test suite). Both create the venv themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# The web viewer the end-to-end report test opens (npm @ohif/app ships its built dist/), pinned
# with the registry's integrity hash; and the node tools in tests/js (package-lock.json).
OHIF_VERSION   := 3.13.2
OHIF_INTEGRITY := sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
VIEWER_DIR     := var/viewer
OHIF_DIR       := $(VIEWER_DIR)/ohif-app-$(OHIF_VERSION)
JS_STAMP       := tests/js/node_modules/.installed

.PHONY: venv system-deps viewer-deps viewer-system-deps postgres test run demo lint bench clean

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

# Debian's chromium (+ chromedriver), Orthanc's DICOMweb plugin and node/npm (when the machine
# has none) for the viewer test; the browser comes from Debian, never downloaded by a tool.
viewer-system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

viewer-deps: viewer-system-deps $(JS_STAMP) $(OHIF_DIR)/dist/index.html

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

# npm pack fetches the one package tarball (not its build-time dependencies); unpacked beside
# its hash check into a temporary folder, then renamed, so a half-unpacked viewer never stays
$(OHIF_DIR)/dist/index.html:
	mkdir -p $(VIEWER_DIR)
	cd $(VIEWER_DIR) && rm -f ohif-app-$(OHIF_VERSION).tgz && \
	  npm pack --silent --loglevel=error @ohif/app@$(OHIF_VERSION) >/dev/null
	@got=$$(python3 -c "import base64,hashlib,sys; print('sha512-' + base64.b64encode(hashlib.sha512(open(sys.argv[1], 'rb').read()).digest()).decode())" $(VIEWER_DIR)/ohif-app-$(OHIF_VERSION).tgz); \
	if [ "$$got" != "$(OHIF_INTEGRITY)" ]; then echo "@ohif/app $(OHIF_VERSION): integrity $$got, expected $(OHIF_INTEGRITY)"; exit 1; fi
	rm -rf $(OHIF_DIR).tmp && mkdir -p $(OHIF_DIR).tmp
	tar xzf $(VIEWER_DIR)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIR).tmp --strip-components=1
	rm -rf $(OHIF_DIR) && mv $(OHIF_DIR).tmp $(OHIF_DIR)
	rm -f $(VIEWER_DIR)/ohif-app-$(OHIF_VERSION).tgz

postgres:
	@if ! pg_isready -h 127.0.0.1 -p 5432 -q; then \
	  echo "starting PostgreSQL"; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	  for i in $$(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done; \
	fi
	@pg_isready -h 127.0.0.1 -p 5432

test: venv system-deps viewer-deps postgres
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
