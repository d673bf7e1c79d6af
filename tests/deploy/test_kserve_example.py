"""The KServe example (deploy/k8s/kserve): a custom ServingRuntime running our image, speaking the Open
Inference Protocol v2, and an InferenceService that selects it.

KServe's CRDs have no schema in kubernetes-validate: the fields we rely on are checked here, and the
runtime's containers, which are core v1 Containers, validate against the Kubernetes Container schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

KUBERNETES_VERSION = "1.30.0"

Render = Callable[[str], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def kserve(kustomize: Render) -> dict[str, dict[str, Any]]:
    resources = kustomize("kserve")
    kinds = [r["kind"] for r in resources]
    assert len(set(kinds)) == len(kinds) and {"InferenceService", "ServingRuntime"} <= set(kinds), kinds
    return {r["kind"]: r for r in resources}


def _validate_core(definition: str, instance: dict[str, Any]) -> None:
    """Validate against one definition of the Kubernetes OpenAPI schemas (strict), e.g. core.v1.Container."""
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    major, minor, _ = KUBERNETES_VERSION.split(".")
    directory = f"kubernetes-json-schema/v{major}.{minor}.0-local-strict"
    definitions = kv.schema_contents(f"{directory}/_definitions.json", KUBERNETES_VERSION)
    schema = {"$id": "https://kubernetes.io/api/check", "$ref": f"/api/_definitions.json#/$defs/{definition}"}
    registry = Resource.from_contents(definitions) @ Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)


KServe = dict[str, dict[str, Any]]


def test_runtime_containers_and_volumes_validate_as_core_kubernetes_objects(kserve: KServe) -> None:
    spec = kserve["ServingRuntime"]["spec"]
    for container in spec["containers"]:
        _validate_core("io.k8s.api.core.v1.Container", container)
    for volume in spec.get("volumes", []):
        _validate_core("io.k8s.api.core.v1.Volume", volume)
    with pytest.raises(Exception, match="imagePullPolcy"):
        _validate_core("io.k8s.api.core.v1.Container", {**spec["containers"][0], "imagePullPolcy": "Always"})


def test_runtime_runs_our_image_speaking_v2_on_port_8000(kserve: KServe, kustomize: Render) -> None:
    runtime = kserve["ServingRuntime"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    assert spec.get("multiModel", False) is False
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container", "the name KServe looks for in a runtime"
    our_image = kustomize("overlays/prod")
    deployment = next(r for r in our_image if r["kind"] == "Deployment")
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == api["image"]
    assert container["args"] == api["args"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert container["ports"] == [{"name": "http1", "containerPort": 8000, "protocol": "TCP"}]
    # the paths that stay open with API keys set: the kubelet sends none
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    # as the Deployment's: time to import torch and load the model before liveness may restart the pod
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_inferenceservice_selects_the_runtime_and_its_model_format(kserve: KServe) -> None:
    service = kserve["InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    runtime = kserve["ServingRuntime"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert "storageUri" not in model, "the model is baked into the image"
    # A session lives in one pod's memory: more than one replica needs the Redis store.
    predictor = service["spec"]["predictor"]
    env = {e["name"]: e.get("value") for e in runtime["spec"]["containers"][0].get("env", [])}
    if predictor.get("maxReplicas", 0) != 1:
        assert env.get("GRU_STORE") == "redis"
    assert service["metadata"]["namespace"] == runtime["metadata"]["namespace"]



def test_the_predictor_gets_no_service_link_the_service_refuses(kserve: KServe, kustomize: Render) -> None:
    """The kubelet gives a pod NAME_SERVICE_HOST, NAME_PORT, ... for each Service of its namespace with a
    cluster IP unless enableServiceLinks is false: here KServe's own <name>-predictor Service (RawDeployment)
    and, in the same namespace, the prod overlay's gru-api. Named GRU_..., those are variables the service
    refuses at start (exit 2), so the predictor would crash-loop."""
    from service.config import unknown_variables

    service = kserve["InferenceService"]
    namespace = service["metadata"]["namespace"]
    names = [f"{service['metadata']['name']}-predictor"]
    names += [r["metadata"]["name"] for r in kustomize("overlays/prod")
              if r["kind"] == "Service" and r["metadata"]["namespace"] == namespace
              and r["spec"].get("clusterIP") != "None"]
    links = {}
    for name in names:
        prefix = name.upper().replace("-", "_")
        links |= {f"{prefix}_SERVICE_HOST": "10.96.0.10", f"{prefix}_PORT": "tcp://10.96.0.10:80"}
    if service["spec"]["predictor"].get("enableServiceLinks", True):
        assert unknown_variables(links) == []


def test_the_predictor_s_grace_period_covers_the_drain(kserve: KServe) -> None:
    """SIGTERM's drain takes up to GRU_REQUEST_TIMEOUT_SECONDS; the pod's grace covers it and a margin, as
    docs/durability.md asks (Kubernetes' default, 30 s, equals the default bound: no margin)."""
    from service.config import Settings

    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    drain = float(env.get("GRU_REQUEST_TIMEOUT_SECONDS", Settings.model_fields["request_timeout_seconds"].default))
    grace = kserve["InferenceService"]["spec"]["predictor"].get("terminationGracePeriodSeconds", 30)
    assert grace >= drain + 5


# The labels KServe's controller gives an InferenceService's predictor pods (RawDeployment and Serverless alike).
PREDICTOR_POD_LABELS = ("serving.kserve.io/inferenceservice", "component")


def _predictor_pod_annotations(kserve: KServe) -> dict[str, str]:
    """The annotations KServe puts on the predictor pods: the runtime's `spec.annotations` (its pod template's;
    the ServingRuntime's own `metadata.annotations` stay on that object), then the InferenceService's, then the
    predictor's, later ones winning."""
    service = kserve["InferenceService"]
    return {
        **kserve["ServingRuntime"]["spec"].get("annotations", {}),
        **service["metadata"].get("annotations", {}),
        **service["spec"]["predictor"].get("annotations", {}),
    }


def _alerts_job(repo: Path) -> str:
    """The job the shipped alerts (and so the dashboard) select: GruApiDown's `up{job="..."}`."""
    groups = yaml.safe_load((repo / "deploy/prometheus/rules/alerts.yml").read_text())["groups"]
    (down,) = [r for g in groups for r in g["rules"] if r.get("alert") == "GruApiDown"]
    found = re.search(r'job="([^"]+)"', down["expr"])
    assert found is not None
    return found.group(1)


def test_predictor_pods_carry_the_api_pods_scrape_annotations(kserve: KServe) -> None:
    """As the Deployment's pods, for a Prometheus that discovers pods by annotation: on the pods themselves,
    pointing at the container's port. `serving.kserve.io/enable-prometheus-scraping: "true"` is no way to get
    them: KServe's pod webhook then rewrites prometheus.io/port to 9091 (9088 with metric aggregation), the
    Knative queue-proxy's, a sidecar a RawDeployment pod has not. Pinned "false", so a cluster-wide default of
    true (inferenceservice-config, metricsAggregator) cannot turn it on either."""
    annotations = _predictor_pod_annotations(kserve)
    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    (port,) = [p["containerPort"] for p in container["ports"]]
    assert {k: annotations.get(k) for k in ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")} \
        == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    # KServe's own keys for a runtime's metrics endpoint (read by its metric aggregation), named alike.
    assert annotations.get("prometheus.kserve.io/port") == str(port)
    assert annotations.get("prometheus.kserve.io/path") == "/metrics"
    assert annotations.get("serving.kserve.io/enable-prometheus-scraping") == "false"


def test_a_podmonitor_scrapes_the_predictor_pods_as_the_job_the_alerts_select(kserve: KServe, repo: Path) -> None:
    """The operator's way, as the base's ServiceMonitor: a PodMonitor selecting the predictor pods by the labels
    KServe gives them, on the container's metrics port, with the job label the shipped alerts and dashboard
    select (a PodMonitor's own would be <namespace>/<name>, which no rule reads)."""
    assert "PodMonitor" in kserve, "deploy/k8s/kserve has no PodMonitor: the operator scrapes no predictor pod"
    monitor = kserve["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = kserve["InferenceService"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    pod_labels = dict(zip(PREDICTOR_POD_LABELS, (service["metadata"]["name"], "predictor"), strict=True))
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and all(pod_labels.get(k) == v for k, v in selector.items()), selector
    assert set(PREDICTOR_POD_LABELS) <= set(selector), "the predictor's pods only, not a transformer's"
    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    port_names = {p.get("name") for p in container["ports"]} - {None}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint.get("port") in port_names and endpoint["path"] == "/metrics"
    for field in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint[field]), field
    jobs = [r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
    assert [(r.get("action", "replace"), r.get("replacement")) for r in jobs] == [("replace", _alerts_job(repo))]


def test_the_predictor_pauses_before_sigterm_as_the_deployment_does(kserve: KServe) -> None:
    """A terminating pod leaves the predictor Service's endpoints while the kubelet already sends SIGTERM: without
    a preStop pause the api stops accepting at once and the requests still routed to it in those seconds fail.
    The grace then covers the pause, the drain and the snapshot's write, as the Deployment's."""
    from service.config import Settings

    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"], "no preStop pause: requests still routed to a terminating pod are refused"
    pause = int(command[1])
    assert pause >= 5, "endpoints take a few seconds to drop a terminating pod everywhere"
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    drain = float(env.get("GRU_REQUEST_TIMEOUT_SECONDS", Settings.model_fields["request_timeout_seconds"].default))
    grace = kserve["InferenceService"]["spec"]["predictor"].get("terminationGracePeriodSeconds", 30)
    assert grace >= pause + drain + 10, "preStop pause + longest in-flight chunk + time to snapshot"


# Kubernetes' values for a probe's fields left out.
_PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                   "failureThreshold": 3}


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_the_predictor_s_probes_time_as_the_deployment_s(probe: str, kserve: KServe, kustomize: Render) -> None:
    """Same process, same start-up, same endpoints: the Deployment's timings hold here too. Left out, a timeout is
    Kubernetes' 1 s, which an event loop busy with a large batch call can miss, and three misses of liveness
    restart the pod with every session it holds."""
    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    deployment = next(r for r in kustomize("base") if r["kind"] == "Deployment")
    api = deployment["spec"]["template"]["spec"]["containers"][0]

    def timings(spec: dict[str, Any]) -> dict[str, int]:
        return {field: spec.get(field, default) for field, default in _PROBE_DEFAULTS.items()}

    assert timings(container[probe]) == timings(api[probe])


def test_the_predictor_mounts_no_service_account_token(kserve: KServe) -> None:
    """The api never talks to the Kubernetes API; as the Deployment's pods, the predictor's get no token to steal
    (left out, KServe's pods mount the namespace's default service account's)."""
    assert kserve["InferenceService"]["spec"]["predictor"].get("automountServiceAccountToken") is False
