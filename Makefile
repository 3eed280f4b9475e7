# upload_progress: see README.md. `make test` and `make demo` install what they need.
SHELL := /bin/bash
CARGO ?= cargo
PHP ?= php8.2
SO := target/release/libupload_progress.so
export UPLOAD_PROGRESS_EXT := $(CURDIR)/$(SO)
# PHP versions `make test` covers: 8.2 on the host, others in a Debian root
# (tools/php-root.sh). `PHP_VERSIONS=8.2 make test` is the quick local run.
PHP_VERSIONS ?= 8.2 8.4
export PHP_VERSIONS
PHP_CONFIG ?= php-config

DEMO_DIR ?= $(CURDIR)/.demo
DEMO_PORT ?= 8080
HUB_PORT ?= 6001
export DEMO_DIR DEMO_PORT HUB_PORT

.PHONY: deps build test deb deb-test install stubs stubs-check bench demo demo-up demo-down soak clean

deps:
	@tools/deps.sh test

build:
	@tools/deps.sh build
	$(CARGO) build --release --quiet

test: deps build
	@tools/test-all.sh

# Debian packages php<X.Y>-upload-progress_<version>_amd64.deb in build/deb: 8.2 from
# the host's build, the other versions built and packed in their Debian root.
deb: build
	@set -e; export SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || date +%s); \
	tools/deb.sh $(SO) build/deb; \
	for v in $(PHP_VERSIONS); do \
	  [ "$$v" = 8.2 ] && continue; \
	  tools/php-root.sh $$v ensure; tools/php-root.sh $$v build; \
	  tools/php-root.sh $$v run env SOURCE_DATE_EPOCH=$$SOURCE_DATE_EPOCH \
	    tools/deb.sh build/php$${v//./}/target/release/libupload_progress.so build/deb; \
	done

# Installs each package in a Debian root of its PHP version and uploads through it.
deb-test: deb
	@tools/deb-test.sh

install: build
	@set -e; v=$$($(PHP_CONFIG) --version | cut -d. -f1,2); conf=/etc/php/$$v; \
	api=$$(basename "$$($(PHP_CONFIG) --extension-dir)"); \
	if ! grep -aq "API$$api,NTS" $(SO); then \
	  echo "install: $(SO) was not built for PHP $$v (API $$api): build with PHP=/usr/bin/php$$v PHP_CONFIG=php-config$$v" >&2; exit 1; fi; \
	install -m 0644 $(SO) "$$($(PHP_CONFIG) --extension-dir)/upload_progress.so"; \
	echo "extension=upload_progress" > $$conf/mods-available/upload_progress.ini; \
	for sapi in cli fpm; do \
	  if [ -d $$conf/$$sapi/conf.d ]; then ln -sf $$conf/mods-available/upload_progress.ini $$conf/$$sapi/conf.d/20-upload_progress.ini; fi; \
	done; echo "installed for PHP $$v ($$conf)"

stubs:
	$(CARGO) php stubs --stdout > stubs/upload_progress.stub.php

stubs-check:
	@$(CARGO) php stubs --stdout | diff -u stubs/upload_progress.stub.php - && echo "stubs: current"

bench: build
	@tools/deps.sh bench
	@tools/bench.sh

demo: build
	@tools/deps.sh demo
	python3 tools/stack.py run --dir "$(DEMO_DIR)" --ext "$(UPLOAD_PROGRESS_EXT)"

demo-up: build
	@tools/deps.sh demo
	python3 tools/stack.py up --dir "$(DEMO_DIR)" --ext "$(UPLOAD_PROGRESS_EXT)"

demo-down:
	python3 tools/stack.py down --dir "$(DEMO_DIR)"

soak: deps build
	UPLOAD_PROGRESS_EXT=$(UPLOAD_PROGRESS_EXT) build/venv/bin/pytest -q -m soak tests/integration

clean:
	$(CARGO) clean
	tools/php-root.sh 8.4 remove; tools/php-root.sh 8.2 remove
	rm -rf --one-file-system build .demo
