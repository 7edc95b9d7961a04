"""What shadows cost the served response, through the real Serve graph over HTTP.

Run with ``make bench-shadows``.  Three apps run side by side on one local Ray cluster:
no shadows, the two shipped shadows, and a slow (2 s) plus a failing shadow.  Requests
alternate between them (so drift on this shared machine hits all three alike) and the
served p50 / p95 are compared.  Goal: shadows add at most 5% to the served p50.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import httpx

from bench.bench_graph import USER_KEY_SECRET, free_port
from tests.factories import tip_body
from tipgraph.settings import TipgraphSettings, load_settings

REQUESTS = 600
TOKEN = "bench-token"
FAULTY = [
    {"policy": {"name": "slow", "kind": "egreedy"}, "fault": {"delay_s": 2.0}},
    {"policy": {"name": "broken", "kind": "egreedy"}, "fault": {"fail": True}},
]


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["TIPGRAPH_API_TOKEN"] = TOKEN
    os.environ["TIPGRAPH_PRIVACY__USER_KEY_SECRET"] = USER_KEY_SECRET
    import ray
    from ray import serve

    from graphs.tipgraph import build_graph

    base = load_settings("configs/tipgraph.yaml")
    variants: dict[str, list[Any]] = {
        "no shadows": [],
        "2 shipped shadows": [s.model_dump() for s in base.shadows],
        "slow (2 s) + failing shadow": FAULTY,
    }
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    timings: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i, shadows in enumerate(variants.values()):
            settings = TipgraphSettings(
                **{
                    **base.model_dump(exclude={"shadows", "store", "serve"}),
                    "serve": {"app_name": f"v{i}", "route_prefix": f"/v{i}", "port": port},
                    "store": {"url": f"sqlite:///{tmp}/v{i}.db"},
                    "shadows": shadows,
                }
            )
            serve.run(build_graph(settings), name=f"v{i}", route_prefix=f"/v{i}")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            for n in range(REQUESTS + 20):
                for i, name in enumerate(variants):
                    start = time.perf_counter()
                    response = client.post(f"/v{i}/v1/tips", json=tip_body(user_id=f"u{n % 20}"))
                    elapsed = time.perf_counter() - start
                    response.raise_for_status()
                    if n >= 20:  # warm-up
                        timings[name].append(elapsed)
        serve.shutdown()
    ray.shutdown()
    base_p50 = statistics.quantiles(timings["no shadows"], n=100)[49]
    print(f"| shadows ({REQUESTS} tips each, HTTP, alternating) | p50 ms | p95 ms | p50 vs none |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in timings.items():
        q = statistics.quantiles(values, n=100)
        print(
            f"| {name} | {q[49] * 1000:.1f} | {q[94] * 1000:.1f} | "
            f"{100 * (q[49] / 1000 / base_p50 * 1000 - 1):+.1f}% |"
        )


if __name__ == "__main__":
    main()
