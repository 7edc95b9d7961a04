"""Offline validation of the k3s manifests (nothing here talks to a cluster).

* ``ray.io`` kinds against the KubeRay v1.7.0 CRDs in ``../shared/k8s-schemas/kuberay/``,
  made strict (unknown fields fail; see :func:`strict`);
* core kinds with ``kubernetes-validate`` in strict mode for Kubernetes 1.34;
* ``serveConfigV2`` as a Serve config whose import path imports, rendered from configs/;
* the Python kustomize build against ``kubectl kustomize`` where kubectl exists.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tipgraph.autoscaling import POLICY_FUNCTION
from tipgraph.serve_config import all_deployment_options
from tipgraph_ops.k3s import (
    OVERLAYS,
    KustomizeError,
    apply_json_patch,
    generated_files,
    kustomize_build,
    overlay_settings,
)

REPO = Path(__file__).resolve().parents[1]
K3S = REPO / "k3s"
# Vendored (gzipped, verbatim) so a clone validates anywhere; SOURCE.md says where from.
SCHEMAS = K3S / "schemas" / "kuberay-v1.7.0"
SHARED_SCHEMAS = REPO.parent / "shared" / "k8s-schemas" / "kuberay"
KUBERNETES_VERSION = "1.34.0"  # a minor current k3s releases ship
BUILDS = {
    **{f"overlays/{env}": K3S / "overlays" / env for env in OVERLAYS},
    "tune": K3S / "tune",
}
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}


# -- strict CRD schemas ------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """The CRD's openAPIV3Schema as a strict JSON schema.

    Objects with ``properties`` get ``additionalProperties: false`` unless they carry
    ``x-kubernetes-preserve-unknown-fields``; a field with a ``default`` is not required
    (the API server fills it in); ``nullable`` admits null; ``x-kubernetes-int-or-string``
    admits both.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    properties = out.get("properties")
    if isinstance(properties, dict):
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        if "required" in out:
            out["required"] = [
                name
                for name in out["required"]
                if not (isinstance(properties.get(name), dict) and "default" in properties[name])
            ]
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    with gzip.open(SCHEMAS / f"{CRD_FILES[kind]}.gz", "rt", encoding="utf-8") as handle:
        crd = yaml.safe_load(handle)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft202012Validator(schema)


def without_nulls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [without_nulls(v) for v in node]
    return node


def crd_errors(document: dict[str, Any]) -> list[str]:
    validator = crd_validator(document["kind"])
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(without_nulls(document))
    ]


def core_errors(document: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(map(str, err.path))}: {err.message}"]
    return []


@cache
def build(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize_build(BUILDS[name]))


def all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in BUILDS for doc in build(name)]


def one(name: str, kind: str, object_name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in build(name) if d["kind"] == kind and object_name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, (name, kind, object_name)
    return copy.deepcopy(found[0])


def pod_templates(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template of a document: workloads, a (Cron)Job's pod, Ray head and worker
    groups, and a RayJob's submitter."""
    spec = document.get("spec", {})
    if document["kind"] in ("Deployment", "StatefulSet"):
        return [spec["template"]]
    if document["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if document["kind"] == "Job":
        return [spec["template"]]
    templates = []
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
    if cluster:
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        templates += [g["template"] for g in groups]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return templates


def pod_specs(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [template["spec"] for template in pod_templates(document)]


@pytest.mark.skipif(not SHARED_SCHEMAS.exists(), reason="no ../shared checkout beside the repo")
def test_the_vendored_crds_are_the_shared_ones() -> None:
    for name in CRD_FILES.values():
        vendored = gzip.decompress((SCHEMAS / f"{name}.gz").read_bytes())
        assert vendored == (SHARED_SCHEMAS / name).read_bytes(), name


# -- every file -----------------------------------------------------------------------------------
def test_every_yaml_file_parses() -> None:
    files = sorted([*K3S.rglob("*.yaml"), *(REPO / "configs" / "k3s").glob("*.yaml")])
    assert len(files) >= 14
    for path in files:
        with open(path, encoding="utf-8") as handle:
            assert [d for d in yaml.safe_load_all(handle) if d is not None], path


def test_serve_config_patches_match_the_configs() -> None:
    for path, text in generated_files(REPO).items():
        assert path.read_text(encoding="utf-8") == text, f"{path}: run `make render-k3s`"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl's kustomize")
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_python_build_equals_kubectl_kustomize(name: str) -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(BUILDS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    expected = sorted(yaml.safe_load_all(done.stdout), key=key)
    assert sorted(build(name), key=key) == expected


def test_the_builds_hold_every_piece() -> None:
    for env in OVERLAYS:
        kinds = {(d["kind"], d["metadata"]["name"]) for d in build(f"overlays/{env}")}
        assert {
            ("Namespace", "tipgraph"),
            ("StatefulSet", "postgres"),
            ("Deployment", "mlflow"),
            ("Deployment", "ollama"),
            ("StatefulSet", "nats"),
            ("Job", "nats-streams"),
            ("RayService", "tipgraph"),
            ("Ingress", "tipgraph"),
        } <= kinds
        for _, doc in [(env, d) for d in build(f"overlays/{env}")]:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "tipgraph"
    assert [d["kind"] for d in build("tune")] == ["RayJob"]


# -- ray.io kinds against the KubeRay CRDs ---------------------------------------------------------
def test_ray_objects_match_the_kuberay_crds() -> None:
    checked = 0
    for name, doc in all_documents():
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1"
            assert crd_errors(doc) == [], (name, doc["kind"])
            checked += 1
    assert checked == len(OVERLAYS) + 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["rayClusterConfig"].update(enableInTreeAutoScaling=True), "Additional"),
        (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="8"), "'8'"),
        (lambda s: s["rayClusterConfig"]["authOptions"].update(mode="password"), "password"),
        (lambda s: s["rayClusterConfig"]["headGroupSpec"].pop("template"), "template"),
        (lambda s: s.update(serveConfigV2={"applications": []}), "string"),
        (
            lambda s: s["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][
                0
            ].update(imagePullPolicy=3),
            "3",
        ),
    ],
)
def test_a_wrong_ray_manifest_is_rejected(mutate: Any, message: str) -> None:
    service = one("overlays/prod", "RayService")
    mutate(service["spec"])
    errors = crd_errors(service)
    assert errors and any(message in e for e in errors), errors


def test_strict_schemas_honour_defaults_nullable_and_preserved_fields() -> None:
    schema = strict(
        {
            "type": "object",
            "required": ["a", "b"],
            "properties": {
                "a": {"type": "string", "default": "x"},
                "b": {"type": "string", "nullable": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"b": None})  # a has a default; b may be null
    assert not validator.is_valid({"a": "x"})  # b is still required
    assert not validator.is_valid({"b": "y", "typo": 1})
    assert validator.is_valid({"b": "y", "free": {"anything": {"goes": 1}}})


# -- core kinds ------------------------------------------------------------------------------------
def test_core_objects_are_valid_kubernetes_in_strict_mode() -> None:
    checked = 0
    for name, doc in all_documents():
        if not doc["apiVersion"].startswith("ray.io/"):
            assert core_errors(doc) == [], (name, doc["kind"], doc["metadata"]["name"])
            checked += 1
    # Per overlay: Namespace, ConfigMap, 3 Services, StatefulSet, 3 PVCs, 2 Deployments,
    # Ingress, 6 NetworkPolicies, the guardrails CronJob.
    assert checked == 2 * 23


def test_a_wrong_core_manifest_is_rejected() -> None:
    deployment = one("overlays/prod", "Deployment", "mlflow")
    deployment["spec"]["replica"] = 1  # misspelled
    assert any("replica" in e for e in core_errors(deployment))
    deployment = one("overlays/prod", "Deployment", "mlflow")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert core_errors(deployment)


# -- serveConfigV2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_serve_config_v2_is_a_serve_config_from_the_same_source(env: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    text = one(f"overlays/{env}", "RayService")["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    settings = overlay_settings(REPO, env)
    (app,) = config.applications
    module, _, attribute = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    assert app.args == {"config": "configs/tipgraph.yaml", "overlays": list(OVERLAYS[env])}
    from ray.serve import Application

    assert isinstance(getattr(importlib.import_module(module), attribute)(app.args), Application)
    options = all_deployment_options(settings)
    assert (
        {d.name for d in app.deployments}
        == set(options)
        >= {
            "ingress",
            "context",
            "generation",
            "scoring",
            "pool",  # k3s serves LLM tips from the candidate pool
        }
    )
    for deployment in app.deployments:
        expected = options[deployment.name]
        assert deployment.autoscaling_config == expected["autoscaling_config"]
        actor_options = deployment.ray_actor_options
        assert actor_options is not None
        assert actor_options.model_dump(exclude_unset=True) == expected["ray_actor_options"]
        assert deployment.max_ongoing_requests == expected["max_ongoing_requests"]
        if "user_config" in expected:  # the policies (scoring, shadows)
            assert deployment.user_config == expected["user_config"]
    # The stages that wait on I/O scale on items there too (tipgraph.autoscaling), and
    # the pool on the refills queued in it.
    on_items = {
        d.name
        for d in app.deployments
        if (d.autoscaling_config or {}).get("policy", {}).get("policy_function") == POLICY_FUNCTION
    }
    assert on_items == {"context", "generation", "pool"}
    # What the app builder loads on the cluster is what the config says.
    assert settings.store.url.startswith("postgresql://") and settings.serve.host == "0.0.0.0"
    assert settings.registry.serve_alias == "champion"


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_every_stage_fits_the_worker_group_at_its_min_and_max(env: str) -> None:
    service = one(f"overlays/{env}", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on head
    (workers,) = cluster["workerGroupSpecs"]
    cpus = _cpus(workers["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    deployments = config["applications"][0]["deployments"]

    def need(bound: str) -> float:
        return sum(
            d["autoscaling_config"][bound] * d["ray_actor_options"]["num_cpus"] for d in deployments
        )

    assert need("min_replicas") <= workers["minReplicas"] * cpus
    assert need("max_replicas") <= workers["maxReplicas"] * cpus
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]


# -- conventions ops rely on -----------------------------------------------------------------------
def test_images_are_pinned_and_containers_have_requests_and_limits() -> None:
    for name, doc in all_documents():
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                image = container["image"]
                tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
                assert tag and tag != "latest", (name, image)
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), (name, container["name"])
                assert {"cpu", "memory"} <= set(resources["limits"]), (name, container["name"])


def test_services_kubernetes_runs_have_readiness_and_liveness_probes() -> None:
    for env in OVERLAYS:
        for kind, object_name in (
            ("StatefulSet", "postgres"),
            ("Deployment", "mlflow"),
            ("Deployment", "ollama"),
        ):
            (container,) = pod_specs(one(f"overlays/{env}", kind, object_name))[0]["containers"]
            assert "readinessProbe" in container and "livenessProbe" in container


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)


def test_secrets_only_through_secret_references() -> None:
    documented = (K3S / "README.md").read_text(encoding="utf-8")
    referenced: set[str] = set()
    for name, doc in all_documents():
        assert doc["kind"] != "Secret", f"{name}: no Secret values are committed"
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                for env in container.get("env", []):
                    # A *_FILE variable names where a mounted Secret is, not a secret.
                    if SECRET_NAME.search(env["name"]) and not env["name"].endswith("_FILE"):
                        assert "value" not in env, (name, env["name"])
                        referenced.add(env["valueFrom"]["secretKeyRef"]["name"])
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    referenced.add(volume["secret"]["secretName"])
    assert referenced == {"tipgraph-postgres", "tipgraph-app", "tipgraph-mlflow", "tipgraph-tokens"}
    for secret in referenced:
        assert f"kubectl -n tipgraph create secret generic {secret}" in documented


def test_serving_reads_scoped_tokens_from_a_mounted_secret_and_no_all_scope_token() -> None:
    for env in OVERLAYS:
        rayservice = one(f"overlays/{env}", "RayService")
        for spec in pod_specs(rayservice):
            (container,) = spec["containers"]
            variables = {e["name"]: e for e in container["env"]}
            assert "TIPGRAPH_API_TOKEN" not in variables, "an env token has every scope"
            path = PurePosixPath(variables["TIPGRAPH_AUTH__TOKENS_FILE"]["value"])
            volumes = {v["name"]: v for v in spec["volumes"]}
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
            # A subPath mount is never updated by the kubelet: rotation would need a restart.
            assert "subPath" not in mount and mount["readOnly"] is True
            assert volumes[mount["name"]]["secret"]["secretName"] == "tipgraph-tokens"


def test_the_ingress_routes_to_services_that_exist() -> None:
    for env in OVERLAYS:
        ingress = one(f"overlays/{env}", "Ingress")
        assert ingress["spec"]["ingressClassName"] == "traefik"
        routes = {
            p["path"]: p["backend"]["service"]
            for rule in ingress["spec"]["rules"]
            for p in rule["http"]["paths"]
        }
        service = one(f"overlays/{env}", "RayService")
        assert routes["/v1"] == {
            "name": f"{service['metadata']['name']}-serve-svc",
            "port": {"number": 8000},
        }
        mlflow = one(f"overlays/{env}", "Service", "mlflow")
        assert routes["/mlflow"]["name"] == "mlflow"
        assert routes["/mlflow"]["port"]["number"] in [p["port"] for p in mlflow["spec"]["ports"]]
        args = pod_specs(one(f"overlays/{env}", "Deployment", "mlflow"))[0]["containers"][0]
        assert "--static-prefix=/mlflow" in args["command"]
        assert any(a.startswith("--allowed-hosts=") for a in args["command"])


def test_the_tuning_job_runs_a_config_that_loads() -> None:
    from tipgraph.settings import load_settings
    from tuning.config import load_tuning_settings

    job = one("tune", "RayJob")
    entrypoint = job["spec"]["entrypoint"].split()
    config = entrypoint[entrypoint.index("--config") + 1]
    tuning = load_tuning_settings(REPO / config)
    settings = load_settings(
        REPO / str(tuning.tipgraph_config), [REPO / o for o in tuning.tipgraph_overlays]
    )
    assert tuning.log.source == "store" and settings.store.url.startswith("postgresql://")
    assert settings.registry.tracking_uri == "http://mlflow:5000/mlflow"
    images = {c["image"] for s in pod_specs(job) for c in s["containers"]}
    service_images = {
        c["image"] for s in pod_specs(one("overlays/prod", "RayService")) for c in s["containers"]
    }
    assert images == service_images  # the same image


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_the_guardrails_check_judges_the_serving_config_and_may_roll_back(env: str) -> None:
    """The CronJob merges the same files as the RayService's serveConfigV2, in order, and
    its arguments are a `tipgraph guardrails check --rollback` the CLI accepts."""
    from tipgraph.settings import load_settings
    from tipgraph_ops.cli import build_parser

    cron = one(f"overlays/{env}", "CronJob", "tipgraph-guardrails")
    (container,) = pod_specs(cron)[0]["containers"]
    args = build_parser().parse_args(container["args"])
    assert container["command"] == ["tipgraph"]
    assert (args.command, args.rollback) == ("guardrails", True)
    app = yaml.safe_load(one(f"overlays/{env}", "RayService")["spec"]["serveConfigV2"])
    (served,) = app["applications"]
    assert [args.config, *args.overlay] == [served["args"]["config"], *served["args"]["overlays"]]
    settings = load_settings(REPO / args.config, [REPO / o for o in args.overlay])
    assert settings.registry.tracking_uri == "http://mlflow:5000/mlflow"
    env_vars = {e["name"]: e.get("value") for e in container["env"]}
    assert env_vars["TIPGRAPH_STORE__URL"].startswith("postgresql://tipgraph_tuning@")
    assert env_vars["TIPGRAPH_STORE__MIGRATE"] == "false"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_the_bus_streams_come_from_the_serving_config_and_serve_consumes_them(env: str) -> None:
    """The nats-streams Job runs `tipgraph bus setup` on the RayService's files, so the
    streams it creates are the ones the bus deployment pulls from."""
    from tipgraph.settings import BUS_DEPLOYMENT, load_settings
    from tipgraph_ops.cli import build_parser

    job = one(f"overlays/{env}", "Job", "nats-streams")
    (container,) = pod_specs(job)[0]["containers"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.print_only) == ("bus", False)
    app = yaml.safe_load(one(f"overlays/{env}", "RayService")["spec"]["serveConfigV2"])
    (served,) = app["applications"]
    assert [args.config, *args.overlay] == [served["args"]["config"], *served["args"]["overlays"]]
    settings = load_settings(REPO / args.config, [REPO / o for o in args.overlay])
    assert (settings.bus.url, settings.bus.reactions) == ("nats://nats:4222", True)
    assert BUS_DEPLOYMENT in {d["name"] for d in served["deployments"]}
    nats = one(f"overlays/{env}", "Service", "nats")
    assert [p["port"] for p in nats["spec"]["ports"]] == [4222]


def test_only_serve_the_set_up_job_and_labelled_clients_reach_nats() -> None:
    for env in OVERLAYS:
        docs = build(f"overlays/{env}")
        (policy,) = [
            d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "nats"
        ]
        peers = _sources(policy)
        labels = [peer["podSelector"]["matchLabels"] for peer in peers]
        assert labels == [
            {"app.kubernetes.io/name": "tipgraph-ray"},
            {"app.kubernetes.io/name": "tipgraph-bus-setup"},
            {"tipgraph.io/bus-client": "true"},
        ]
        assert [r["ports"] for r in policy["spec"]["ingress"]] == [
            [{"protocol": "TCP", "port": 4222}]
        ]


# -- the image -------------------------------------------------------------------------------------
def test_everything_the_dockerfile_copies_exists() -> None:
    lines = (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), source
    assert not any(":latest" in line for line in lines if line.startswith("FROM"))


def test_the_runtime_lockfile_pins_what_the_dev_lockfile_pins() -> None:
    def pins(name: str) -> dict[str, str]:
        text = (REPO / name).read_text(encoding="utf-8")
        return dict(re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", text, re.MULTILINE))

    runtime, dev = pins("requirements-runtime.lock"), pins("requirements.lock")
    assert {"ray", "mlflow", "litellm", "psycopg"} <= set(runtime)
    # The MLflow Deployment runs MLflow's basic-auth app, which needs mlflow[auth].
    mlflow = pod_specs(one("overlays/prod", "Deployment", "mlflow"))[0]["containers"][0]
    assert "--app-name=basic-auth" in mlflow["command"] and "flask-wtf" in runtime
    assert {name: dev.get(name) for name in runtime} == runtime
    assert "pytest" not in runtime


# -- the renderer itself ---------------------------------------------------------------------------
def test_json_patches_add_replace_and_remove() -> None:
    doc = {"a": {"b": [1, 2]}, "c": 1}
    patched = apply_json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "replace", "path": "/c", "value": 2},
            {"op": "remove", "path": "/a/b/0"},
            {"op": "add", "path": "/d~1e", "value": True},
        ],
    )
    assert patched == {"a": {"b": [2, 3]}, "c": 2, "d/e": True}
    assert doc == {"a": {"b": [1, 2]}, "c": 1}  # the input is untouched
    with pytest.raises(KustomizeError, match="does not exist"):
        apply_json_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])
    with pytest.raises(KustomizeError, match="outside"):
        apply_json_patch(doc, [{"op": "remove", "path": "/a/b/5"}])
    with pytest.raises(KustomizeError, match="unsupported patch op"):
        apply_json_patch(doc, [{"op": "move", "from": "/c", "path": "/d"}])


def test_kustomize_features_it_does_not_implement_are_refused(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\nconfigMapGenerator: [{name: x}]\n", encoding="utf-8"
    )
    with pytest.raises(KustomizeError, match="configMapGenerator"):
        kustomize_build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [a.yaml]\npatches: [{target: {kind: Service}, patch: 'metadata: {}'}]\n",
        encoding="utf-8",
    )
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n")
    with pytest.raises(KustomizeError, match="JSON 6902"):
        kustomize_build(tmp_path)


def test_every_serving_pod_keeps_the_decision_log_on_the_node() -> None:
    """Write-ahead logs in the container's writable layer die with the pod: the replica
    that replaces a killed one could not replay them.  Every Ray pod mounts a node path at
    the spill_dir it is configured with."""
    services = [doc for _, doc in all_documents() if doc["kind"] == "RayService"]
    assert services
    for service in services:
        name = service["metadata"]["name"]
        for spec in pod_specs(service):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                env = {e["name"]: e.get("value") for e in container["env"]}
                spill_dir = env["TIPGRAPH_STORE__SPILL_DIR"]
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert spill_dir in mounts, (name, container["name"])
                assert "hostPath" in volumes[mounts[spill_dir]], (name, container["name"])


# -- hardening (issue 19) ---------------------------------------------------------------------
HARDENED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_container_runs_non_root_on_a_read_only_root_filesystem() -> None:
    checked = 0
    for name, doc in all_documents():
        for spec in pod_specs(doc):
            pod = spec.get("securityContext", {})
            assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, (name, doc["kind"])
            for container in _containers(spec):
                context = container.get("securityContext", {})
                where = (name, doc["metadata"]["name"], container["name"])
                assert {k: context.get(k) for k in HARDENED_CONTAINER} == HARDENED_CONTAINER, where
                assert context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
                user = context.get("runAsUser", pod.get("runAsUser"))
                assert isinstance(user, int) and user > 0, where
                # A read-only root needs somewhere to write: Ray, MLflow and Postgres use /tmp.
                assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, where
                checked += 1
        if doc["kind"] == "RayService":
            sidecar = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
            assert {k: sidecar.get(k) for k in HARDENED_CONTAINER} == HARDENED_CONTAINER
            assert sidecar.get("runAsNonRoot") is True
    assert checked >= 13  # 2 overlays x (postgres, mlflow, ollama, head, worker) + 3 tuning


def test_only_the_ray_head_mounts_a_service_account_token() -> None:
    """The head's autoscaler sidecar scales the worker pods through the Kubernetes API;
    nothing else calls it."""
    for name, doc in all_documents():
        templates = pod_templates(doc)
        head = (
            doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
            if (doc["kind"] == "RayService")
            else None
        )
        for template in templates:
            if template is not head:
                assert template["spec"].get("automountServiceAccountToken") is False, (
                    name,
                    doc["metadata"]["name"],
                )


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


SERVES_NOTHING = {"tipgraph-guardrails", "tipgraph-bus-setup"}  # connect out, accept none


def test_every_pod_is_selected_by_a_network_policy_over_a_default_deny() -> None:
    tune_templates = [t for doc in build("tune") for t in pod_templates(doc)]
    assert tune_templates
    for env in OVERLAYS:
        docs = build(f"overlays/{env}")
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        (deny,) = [p for p in policies if p["spec"]["podSelector"] == {}]
        assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
        allowing = [p for p in policies if p is not deny]
        templates = [t for doc in docs for t in pod_templates(doc)] + tune_templates
        assert len(templates) >= 6
        for template in templates:
            labels = template.get("metadata", {}).get("labels", {})
            selected = any(_selects(p, labels) for p in allowing)
            if labels.get("app.kubernetes.io/name") in SERVES_NOTHING:
                assert not selected, labels  # the default deny alone: no way in
            else:
                assert labels and selected, labels


def _sources(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]


def test_only_serve_reaches_ollama_and_the_store() -> None:
    for env in OVERLAYS:
        docs = build(f"overlays/{env}")
        policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
        ray = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tipgraph-ray"}}}
        assert _sources(policies["ollama"]) == [ray]
        assert [r["ports"] for r in policies["ollama"]["spec"]["ingress"]] == [
            [{"protocol": "TCP", "port": 11434}]
        ]
        store = _sources(policies["postgres"])
        names = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in store}
        assert names == {"tipgraph-ray", "mlflow", "tipgraph-tune", "tipgraph-guardrails"}
        # Nothing from outside the namespace reaches the store.
        assert all("namespaceSelector" not in peer for peer in store)


def test_the_ingress_serves_tls_only() -> None:
    for env in OVERLAYS:
        ingress = one(f"overlays/{env}", "Ingress")
        annotations = ingress["metadata"]["annotations"]
        assert annotations["traefik.ingress.kubernetes.io/router.entrypoints"] == "websecure"
        assert annotations["traefik.ingress.kubernetes.io/router.tls"] == "true"
        (tls,) = ingress["spec"]["tls"]
        assert tls["secretName"] == "tipgraph-tls"
        hosts = [rule.get("host") for rule in ingress["spec"]["rules"]]
        assert hosts and all(host in tls["hosts"] for host in hosts)


def test_mlflow_users_are_not_under_the_served_artifact_root() -> None:
    """``--serve-artifacts`` hands out every file under the artifact destination to
    anyone who may read: the basic-auth database must live elsewhere."""
    readme = (K3S / "README.md").read_text(encoding="utf-8")
    (database,) = set(re.findall(r"database_uri = sqlite:///([^\s`]+)", readme))
    for env in OVERLAYS:
        (container,) = pod_specs(one(f"overlays/{env}", "Deployment", "mlflow"))[0]["containers"]
        (artifacts,) = [
            a.split("=", 1)[1]
            for a in container["command"]
            if a.startswith("--artifacts-destination=")
        ]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert not Path(database).is_relative_to(artifacts)
        database_mount = next(p for p in mounts if Path(database).is_relative_to(p))
        assert mounts[database_mount] != mounts[artifacts]


def test_pods_reach_mlflow_with_their_own_account_never_admin() -> None:
    """Serving only reads the registry (READ); the tuning job and the guardrails check
    (which moves the champion alias) write with the tuning user."""
    expected = {"RayService": "serving", "RayJob": "tuning", "CronJob": "tuning"}
    seen = set()
    for name, doc in all_documents():
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                keys = {
                    env["name"]: env["valueFrom"]["secretKeyRef"]["key"]
                    for env in container.get("env", [])
                    if env["name"].startswith("MLFLOW_TRACKING_")
                }
                if not keys:
                    continue
                account = expected[doc["kind"]]
                assert keys == {
                    "MLFLOW_TRACKING_USERNAME": f"{account}-username",
                    "MLFLOW_TRACKING_PASSWORD": f"{account}-password",
                }, (name, container["name"])
                seen.add(doc["kind"])
    assert seen == set(expected)


def test_each_workload_reaches_postgres_as_its_own_role() -> None:
    """Serve as tipgraph_app, the tuning job as the read-only tipgraph_tuning, MLflow as
    mlflow; the superuser's password only in Postgres's own pod."""
    password_keys: dict[str, set[str]] = {}
    for _, doc in all_documents():
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef", {})
                    if ref.get("name") == "tipgraph-postgres":
                        password_keys.setdefault(doc["kind"], set()).add(ref["key"])
    assert password_keys == {
        "RayService": {"app-password"},
        "RayJob": {"tuning-password"},
        "CronJob": {"tuning-password"},  # the guardrails check, read-only like tuning
        "Deployment": {"mlflow-password"},  # MLflow
        "StatefulSet": {
            "superuser-password",
            "app-password",
            "tuning-password",
            "mlflow-password",
        },
    }
    for env in OVERLAYS:
        store = overlay_settings(REPO, env).store
        assert store.url.startswith("postgresql://tipgraph_app@") and store.pg_schema
        (mlflow,) = pod_specs(one(f"overlays/{env}", "Deployment", "mlflow"))[0]["containers"]
        assert (
            "--backend-store-uri=postgresql+psycopg://mlflow@postgres:5432/mlflow"
            in (mlflow["command"])
        )
    for spec in pod_specs(one("tune", "RayJob")):
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if env:
                assert env["TIPGRAPH_STORE__URL"].startswith("postgresql://tipgraph_tuning@")
                assert env["TIPGRAPH_STORE__MIGRATE"] == "false"
