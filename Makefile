# Ferry — set-up and everyday commands. Each target installs what it needs.
SHELL := /bin/bash
CARGO ?= cargo
DEMO_DIR ?= /var/lib/ferry/demo

.PHONY: deps build test demo demo-down bench lint

# Debian packages the tests, the demo and the benchmarks use; installed when missing.
APT_PACKAGES := nftables iptables iproute2 conntrack curl iperf3 clang-19 libbpf-dev linux-libc-dev procps \
	nginx-light redis-server python3 fonts-dejavu-core

deps:
	@scripts/install-deps.sh $(APT_PACKAGES)

build: deps
	$(CARGO) build --workspace --all-targets

# All tests: unit tests, golden tests and the end-to-end tests with real kubectl,
# real namespaces and real kernel rules. Privileged tests need root (CI runs as root).
test: deps
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --workspace --no-fail-fast --retries 0

# The main job: a control plane with an example app applied, then what to try next.
demo: deps
	$(CARGO) build --bin ferry
	@scripts/demo.sh "$(DEMO_DIR)"

demo-down:
	@scripts/demo.sh --down "$(DEMO_DIR)"

bench: deps
	$(CARGO) build --release --bin ferry
	./target/release/ferry bench all --out results

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
