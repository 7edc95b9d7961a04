# Every target does its own set-up: a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed-stamp
PG_VERSION_DIR := /etc/postgresql

.PHONY: install run test unit lint postgres nats proto lock render-serve-config render-k3s bench bench-levers bench-durability bench-profile bench-cpu bench-candidates bench-test-times bench-policies bench-tuning bench-log-size bench-log-scale bench-shadows bench-bus bench-pool bench-embeddings bench-drift tune rehearsal \
	compare-policies clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## run: serve the graph on http://127.0.0.1:8000 (SQLite decision log, task-mode tips)
run: install
	@test -n "$$TIPGRAPH_PRIVACY__USER_KEY_SECRET" || echo "make run: no TIPGRAPH_PRIVACY__USER_KEY_SECRET, so user ids are pseudonymised with the public development key (local runs only)"
	TIPGRAPH_API_TOKEN=$${TIPGRAPH_API_TOKEN:-local-dev-token} TIPGRAPH_PRIVACY__ALLOW_DEV_SECRET=true $(BIN)/tipgraph serve

## test: lint, type-check, import contracts and every test (needs the local Postgres and
## NATS; started if down)
test: install postgres nats lint
	$(BIN)/pytest

unit: install
	$(BIN)/pytest -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

NATS_SERVER ?= /usr/sbin/nats-server
NATS_UP := $(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 4222), 2)" 2>/dev/null
nats:
	@if [ -x $(NATS_SERVER) ] && ! $(NATS_UP); then \
		echo "starting the local NATS server (JetStream)"; \
		start-stop-daemon --start --oknodo --background --exec $(NATS_SERVER) -- \
			-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log; \
		for i in $$(seq 1 30); do $(NATS_UP) && break; sleep 1; done; \
	fi

## proto: regenerate tipgraph/events from proto/ (tests/test_reactions.py fails when they drift)
PROTO_OUT ?= .
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		proto/tipgraph/events/v1/events.proto

postgres:
	@if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then \
		echo "starting the local PostgreSQL cluster"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls $(PG_VERSION_DIR)) main start; \
		for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
	fi

## lock: re-resolve the lockfiles from pyproject.toml (dev + runtime, for the image)
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 -c requirements.lock \
		-o requirements-runtime.lock

## bench-policies: policy throughput vs MABWiser, scoring latency, state memory
bench-policies: install
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r bench/requirements.txt
	$(BIN)/python bench/bench_policies.py

## bench-tuning: progressive replay throughput, and a 32-trial sweep over 100,000 events
bench-tuning: install
	$(BIN)/python bench/bench_tuning.py

## bench-log-size: decision-log bytes per decision on SQLite and Postgres, task and mixed
## mode, this code against the schema-8 layout (85b2cf5), same simulated traffic
bench-log-size: install postgres
	PYTHONPATH=. $(BIN)/python bench/bench_log_size.py

## bench-log-scale: a 10-million-decision Postgres log (DECISIONS=... to change): hot reads
## p99, one writer's inserts, a week's drop by retention, each hot query's plan
DECISIONS ?= 10000000
bench-log-scale: install postgres
	PYTHONPATH=. $(BIN)/python bench/bench_log_scale.py --decisions $(DECISIONS)

## bench: the Serve graph vs a single-process baseline, same run; then generation's hop
## before and after issue 16, task mode and a 0.5 s LLM, interleaved (BENCHMARKS.md)
bench: install
	PYTHONPATH=. $(BIN)/python bench/bench_graph.py
	PYTHONPATH=. $(BIN)/python bench/bench_graph.py --load-signal --rounds 3

## bench-pool: LLM tips from the candidate pool against a slow stub (generation 3 s, judge
## 1 s, embeddings 50 ms), returning users, c = 1 and 16, against task mode (BENCHMARKS.md)
bench-pool: install
	PYTHONPATH=. $(BIN)/python bench/bench_pool.py

## bench-embeddings: reward share of the oracle after 20k simulated decisions with and
## without the embedding features, 3 seeds, and the judge's rejection rate (BENCHMARKS.md)
bench-embeddings: install
	PYTHONPATH=. $(BIN)/python bench/bench_embedding_features.py

## bench-drift: decisions each learner needs to regain 90% of the oracle after the simulated users'
## habits turn around, with and without forgetting (half_life_s), 5 seeds (BENCHMARKS.md)
bench-drift: install
	PYTHONPATH=. $(BIN)/python bench/bench_drift.py

## rehearsal: 3 Ray nodes on this machine, Postgres, the Ollama stub (0.5 s): scale out and
## in, in-place update, node loss, database restart (var/rehearsal/result.json, timeline.png)
rehearsal: install postgres
	$(BIN)/tipgraph rehearse

## bench-levers: each performance lever against the same baseline (BENCHMARKS.md)
bench-levers: install
	PYTHONPATH=. $(BIN)/python bench/bench_graph.py --levers

## bench-durability: what store.durability=durable costs against buffered (BENCHMARKS.md)
bench-durability: install
	PYTHONPATH=. $(BIN)/python bench/bench_graph.py --durability --rounds 3

## bench-profile: CPU ms per request and RSS per process of the graph, py-spy by layer
bench-profile: install
	PYTHONPATH=. $(BIN)/python bench/profile_graph.py

## bench-cpu: CPU ms per tip over every process at c = 16, the graph against the
## single-process baseline, 3 rounds ABBA (issue 21, goal 1; BENCHMARKS.md)
bench-cpu: install
	PYTHONPATH=. $(BIN)/python bench/profile_graph.py --rounds 3

## bench-candidates: served p50 at K = 50 against K = 5 at c = 16, LLM mode through the
## Ollama stub, 3 rounds ABBA (issue 21, goal 3; BENCHMARKS.md)
bench-candidates: install
	PYTHONPATH=. $(BIN)/python bench/bench_graph.py --candidates --rounds 3

## bench-test-times: the unit tests' wall time, this checkout against BEFORE (another
## checkout), 2 rounds ABBA: the whole set and every test slower by > 10% (BENCHMARKS.md)
ROUNDS ?= 2
TEST_TIME_FILES ?= tests/test_store.py tests/test_decision_log.py tests/test_service.py \
	tests/test_tuning_data.py tests/test_report.py tests/test_sweep.py tests/test_cli.py \
	tests/test_ope.py tests/test_policies.py tests/test_sync.py tests/test_privacy.py
bench-test-times: install postgres
	@test -n "$(BEFORE)" || { echo "BEFORE=<an earlier checkout> is required"; exit 2; }
	PYTHONPATH=. $(BIN)/python bench/test_times.py --before $(BEFORE) --rounds $(ROUNDS) \
		$(TEST_TIME_FILES)

## bench-bus: reactions from NATS through the Serve graph: one reactions replica's
## reactions/s (3 rounds), and the lag's return to zero after a 60 s outage (3 rounds)
bench-bus: install postgres nats
	PYTHONPATH=. $(BIN)/python bench/bench_bus.py

## bench-shadows: what shadows add to the served p50, through Serve over HTTP: shipped,
## slow and failing shadows side by side; then none vs shipped at c = 1 and 16, 3 rounds
bench-shadows: install
	PYTHONPATH=. $(BIN)/python bench/bench_shadows.py
	PYTHONPATH=. $(BIN)/python bench/bench_graph.py --shadows --rounds 3

## tune: Ray Tune sweep on the decision log (configs/tuning.yaml); winner -> @challenger
tune: install
	$(BIN)/tipgraph tune --config configs/tuning.yaml

## compare-policies: every policy on the simulator, 20,000 decisions x 5 seeds
compare-policies: install
	$(BIN)/tipgraph compare-policies --seeds 5 --decisions 20000

render-serve-config: install
	$(BIN)/tipgraph render-serve-config

## render-k3s: the k3s overlays' serveConfigV2 patches, from configs/ (never edit them)
render-k3s: install
	$(BIN)/tipgraph render-k3s

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
