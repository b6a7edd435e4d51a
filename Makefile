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
# librdkafka, a C toolchain for librdkafka's own build, promtool for the metrics checks,
# kcat for producing events by hand, aiosmtpd as the real SMTP server the delivery tests
# send to.
APT_PACKAGES := build-essential libclang-dev librocksdb-dev libssl-dev zlib1g-dev pkg-config \
  prometheus kcat python3-aiosmtpd

.PHONY: all deps deps-pgo build release pgo run test lint fmt bench bench-delivery bench-arbiter \
  bench-identity clean
BENCH_EVENTS ?= 20000000
BENCH_CUSTOMERS ?= 1000000
BENCH_SENDS ?= 200000
BENCH_TRIGGERS ?= 2000000
BENCH_SCENARIO ?= abandoned_cart
BENCH_IDENTITY_EVENTS ?= 2000000
# Records per state commit in `make bench` and `make bench-arbiter` (production commits
# every 1,000 by default; a replay commits as rarely as its memory allows).
BENCH_BATCH ?= 100000
# Benchmark traffic leaves the catalog alone whatever the config sets for the demo (a
# sale of a bestseller fans out to every customer who viewed it: the profile benchmark
# measures customer events).
BENCH_GENERATE := KAIROS__GENERATOR__CATALOG_CHANGE_SHARE=0
# Generated traffic files are named after the generator's code, the event contracts
# and ids it writes, the crates it draws with (Cargo.lock) and the config's
# [generator] section, so a changed generator generates them again (the old file of
# that kind and size is removed) instead of measuring a file of the old traffic.
TRAFFIC := $(shell { cat services/kairos-generator/src/*.rs services/kairos-core/src/contracts.rs \
  services/kairos-core/src/ids.rs Cargo.lock; \
  awk '/^\[/ { g = ($$0 ~ /^\[generator\]/) } g' config/kairos.toml; } | cksum | cut -d' ' -f1)
BENCH_EVENTS_FILE := var/bench/events-$(BENCH_EVENTS)-$(BENCH_CUSTOMERS)-$(TRAFFIC).jsonl
BENCH_IDENTITY_FILE := var/bench/identity-$(BENCH_IDENTITY_EVENTS)-$(BENCH_CUSTOMERS)-$(TRAFFIC).jsonl

# The benchmarks measure a profile-guided build (PGO=1, the default): `make pgo` builds
# kairos instrumented, trains it with deploy/pgo/train.sh on its own smaller generated
# traffic, and builds it again with the merged profile. PGO=0 measures the plain
# release build. The profile is named after the instrumented binary's hash, so it is
# trained again exactly when the code changes (cargo tracks RUSTFLAGS, not the file).
# llvm-profdata must match rustc's LLVM (22 for rustc 1.95): Debian's llvm-22.
PGO ?= 1
PGO_DIR := $(CARGO_TARGET_DIR)/pgo
PGO_INSTRUMENTED := $(PGO_DIR)/instrumented/release/kairos
LLVM_PROFDATA := llvm-profdata-22
ifeq ($(PGO),1)
BENCH_BUILD := pgo
BENCH_KAIROS := $(PGO_DIR)/optimized/release/kairos
else
BENCH_BUILD := release
BENCH_KAIROS := $(CARGO_TARGET_DIR)/release/kairos
endif

all: build

# Installs those of the Debian packages $(1) that are missing (removed but not
# purged counts as missing). Waits for the apt lock a fresh VM's unattended upgrades
# may hold; without root, needs sudo that asks no password, and says what to run if
# there is none.
define install_missing
@missing=""; \
for p in $(1); do \
  [ "$$(dpkg-query -W -f='$${Status}' $$p 2>/dev/null)" = "install ok installed" ] || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
  echo "installing system packages:$$missing"; \
  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; \
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
  else echo "cannot install them without root: run  sudo apt-get install$$missing" >&2; exit 1; fi; \
  for try in $$(seq 60); do \
    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq && break; \
    echo "apt-get update failed (the package lists may be locked); trying again in 10 s" >&2; sleep 10; \
  done; \
  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing >/dev/null; \
fi
endef

deps:
	$(call install_missing,$(APT_PACKAGES))

deps-pgo: deps
	$(call install_missing,llvm-22)

build: deps
	$(CARGO) build --workspace --all-targets

run: deps
	$(CARGO) build -p kairos
	$(KAIROS) --config config/kairos.toml up

test: build lint
	$(KAIROS) --config config/kairos.toml check-config
	promtool check config deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml
	$(CARGO) test --workspace --no-fail-fast

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

release: deps
	$(CARGO) build --release -p kairos

pgo: deps-pgo
	CARGO_TARGET_DIR=$(PGO_DIR)/instrumented RUSTFLAGS="-Cprofile-generate=$(PGO_DIR)/raw" \
	  $(CARGO) build --release -p kairos
	set -e; \
	profile="$(PGO_DIR)/kairos-$$(sha256sum $(PGO_INSTRUMENTED) | cut -c1-16).profdata"; \
	if [ ! -s "$$profile" ]; then \
	  rm -rf $(PGO_DIR)/raw; \
	  bash deploy/pgo/train.sh $(PGO_INSTRUMENTED) $(PGO_DIR)/train; \
	  $(LLVM_PROFDATA) merge -o "$$profile.tmp" $(PGO_DIR)/raw; \
	  mv "$$profile.tmp" "$$profile"; \
	fi; \
	CARGO_TARGET_DIR=$(PGO_DIR)/optimized RUSTFLAGS="-Cprofile-use=$$profile" \
	  $(CARGO) build --release -p kairos

# One delivery worker with the simulator, in process on RocksDB.
bench-delivery: $(BENCH_BUILD)
	$(BENCH_KAIROS) --config config/kairos.toml bench-delivery \
	  --channel email --count $(BENCH_SENDS)

# The identity processor on one core (taskset): generated traffic from a file, read
# before the clock starts; reports events per second and per CPU-second.
bench-identity: $(BENCH_BUILD)
	mkdir -p var/bench
	test -s $(BENCH_IDENTITY_FILE) || { rm -f var/bench/identity-$(BENCH_IDENTITY_EVENTS)-$(BENCH_CUSTOMERS)-*.jsonl; \
	  $(BENCH_GENERATE) $(BENCH_KAIROS) --config config/kairos.toml generate \
	    --to-file $(BENCH_IDENTITY_FILE) \
	    --count $(BENCH_IDENTITY_EVENTS) --customers $(BENCH_CUSTOMERS) --span-days 60; }
	KAIROS__STATE__MAX_BATCH_RECORDS=10000 taskset -c 0 $(BENCH_KAIROS) \
	  --config config/kairos.toml bench-identity \
	  $(BENCH_IDENTITY_FILE)

bench-arbiter: $(BENCH_BUILD)
	KAIROS__STATE__MAX_BATCH_RECORDS=$(BENCH_BATCH) KAIROS__STATE__CACHE_ENTRIES=1200000 \
	  $(BENCH_KAIROS) --config config/kairos.toml \
	  bench-arbiter --count $(BENCH_TRIGGERS) --customers $(BENCH_CUSTOMERS) --scenario $(BENCH_SCENARIO)

# Replay benchmark of the profile processor (with the catalog join) on RocksDB on
# disk: generated traffic to a file, then `kairos replay` reports events/s, events
# per CPU-second and peak memory.
bench: $(BENCH_BUILD)
	mkdir -p var/bench
	test -s $(BENCH_EVENTS_FILE) || { rm -f var/bench/events-$(BENCH_EVENTS)-$(BENCH_CUSTOMERS)-*.jsonl; \
	  $(BENCH_GENERATE) $(BENCH_KAIROS) --config config/kairos.toml generate \
	    --to-file $(BENCH_EVENTS_FILE) \
	    --count $(BENCH_EVENTS) --customers $(BENCH_CUSTOMERS) --span-days 180; }
	rm -rf var/bench/state
	KAIROS__IDENTITY__ENABLED=false KAIROS__STATE__MAX_BATCH_RECORDS=$(BENCH_BATCH) KAIROS__STATE__CACHE_ENTRIES=1200000 \
	  $(BENCH_KAIROS) --config config/kairos.toml replay --no-arbiter \
	    --state-dir var/bench/state --output /dev/null \
	    $(BENCH_EVENTS_FILE)

clean:
	rm -rf var
