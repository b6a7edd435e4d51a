# Kairos: `make run` starts the whole pipeline on the embedded broker with generated
# traffic; `make test` runs the whole test suite. Both install what they need.

SHELL := /bin/bash
CARGO ?= cargo
# One build cache for every run and both commands (RocksDB and librdkafka are slow to
# build on small machines).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/kairos/target
KAIROS := $(CARGO_TARGET_DIR)/debug/kairos
# System packages: libclang for RocksDB's bindings, Debian's RocksDB library (linked
# instead of compiling the bundled copy, see .cargo/config.toml), OpenSSL and zlib for
# librdkafka, promtool for the metrics checks, kcat for producing events by hand.
APT_PACKAGES := libclang-dev librocksdb-dev libssl-dev zlib1g-dev pkg-config prometheus kcat

.PHONY: all deps build run test lint fmt bench clean

all: build

deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

build: deps
	$(CARGO) build --workspace --all-targets

run: deps
	$(CARGO) build -p kairos
	$(KAIROS) --config config/kairos.toml up

test: build lint
	$(KAIROS) --config config/kairos.toml check-config
	$(CARGO) test --workspace --no-fail-fast

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	rm -rf var
