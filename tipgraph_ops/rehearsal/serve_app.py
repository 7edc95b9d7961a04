"""The Serve application on a cluster, through the dashboard's REST API: deployed with
``serve deploy`` (what KubeRay does with a RayService's serveConfigV2) and watched with
``GET /api/serve/applications/``."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tipgraph_ops.rehearsal.result import Sample


class DeployError(RuntimeError):
    """``serve deploy`` refused the config, or the app did not come up."""


class ServeApp:
    def __init__(
        self,
        dashboard_url: str,
        app_name: str,
        serve_bin: Path,
        *,
        env: dict[str, str],
        headers: dict[str, str],
    ) -> None:
        self.dashboard_url = dashboard_url
        self.app_name = app_name
        self.serve_bin = serve_bin
        self.env = env
        """``serve deploy``'s environment: it carries the cluster's auth token."""
        self.headers = headers

    def deploy(self, config: Path) -> None:
        result = subprocess.run(
            [str(self.serve_bin), "deploy", str(config), "--address", self.dashboard_url],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
        )
        if result.returncode != 0:
            raise DeployError(f"serve deploy {config} failed:\n{result.stderr[-2000:]}")

    def details(self) -> dict[str, Any] | None:
        response = httpx.get(
            f"{self.dashboard_url}/api/serve/applications/", headers=self.headers, timeout=5
        )
        response.raise_for_status()
        app: dict[str, Any] | None = response.json().get("applications", {}).get(self.app_name)
        return app

    def wait_running(
        self,
        args: dict[str, Any],
        timeout_s: float,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> float:
        """Wait until the app runs ``args`` with every deployment healthy and running the
        given ``options`` (deployment -> option -> value); seconds waited."""
        started = time.monotonic()
        last = "no application yet"
        while time.monotonic() - started < timeout_s:
            try:
                app = self.details()
            except (httpx.HTTPError, ValueError) as err:
                last = f"dashboard: {err}"
                app = None
            if app is not None:
                deployed = (app.get("deployed_app_config") or {}).get("args")
                healthy = all(d["status"] == "HEALTHY" for d in app["deployments"].values())
                if (
                    app["status"] == "RUNNING"
                    and deployed == args
                    and healthy
                    and _runs(app, options or {})
                ):
                    return time.monotonic() - started
                if app["status"] == "DEPLOY_FAILED":
                    raise DeployError(f"the app failed to deploy: {app.get('message', '')}")
                last = f"{app['status']}: {app.get('message', '')[:300]}"
            time.sleep(1.0)
        raise DeployError(f"the app was not running within {timeout_s:.0f} s ({last})")

    def runs(self, options: dict[str, dict[str, Any]]) -> bool:
        """Whether the deployments report these options now (see :meth:`wait_running`)."""
        app = self.details()
        return app is not None and _runs(app, options)

    def sample(self, t: float) -> Sample | None:
        try:
            app = self.details()
        except (httpx.HTTPError, ValueError):
            return None
        if app is None:
            return None
        replicas, nodes = {}, {}
        for name, deployment in app["deployments"].items():
            running = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
            replicas[name] = len(running)
            nodes[name] = [str(r.get("node_id")) for r in running]
        return Sample(t, replicas, nodes)


class Sampler:
    """Samples the app's replicas every ``interval_s`` in a thread, on the rehearsal clock."""

    def __init__(
        self,
        app: ServeApp,
        now: Callable[[], float],
        *,
        interval_s: float = 1.0,
        also: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.now = now
        self.interval_s = interval_s
        self.also = also
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.app.sample(self.now())
            if sample is not None:
                self.samples.append(sample)
            if self.also is not None:
                self.also()
            self._stop.wait(self.interval_s)

    def wait_for(
        self, condition: Callable[[Sample], bool], timeout_s: float, since: float | None = None
    ) -> Sample | None:
        """The first sample (taken after ``since``) for which ``condition`` holds, waiting
        up to ``timeout_s``; None if none did."""
        since = self.now() if since is None else since
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            fresh = self.samples[seen:]
            seen += len(fresh)
            for sample in (s for s in fresh if s.t >= since):
                if condition(sample):
                    return sample
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


def _runs(app: dict[str, Any], options: dict[str, dict[str, Any]]) -> bool:
    """Whether every deployment in ``options`` reports those values in its config (a key
    ``a.b`` is ``config["a"]["b"]``)."""
    for name, wanted in options.items():
        config = app["deployments"].get(name, {}).get("deployment_config", {})
        for key, value in wanted.items():
            found: Any = config
            for part in key.split("."):
                found = found.get(part) if isinstance(found, dict) else None
            if found != value:
                return False
    return True
