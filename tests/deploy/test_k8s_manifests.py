"""Kubernetes manifests (deploy/k8s): every overlay renders with kustomize, every core resource validates
against the Kubernetes schemas, and the properties the deployment depends on hold in every overlay."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The Kubernetes version the manifests are written and validated for (kubernetes-validate's offline schemas).
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ["overlays/dev", "overlays/prod", "overlays/gpu"]
# Resources of CRDs have no schema in kubernetes-validate: checked field by field below (and in
# test_kserve_example).
CRD_KINDS = {"ServiceMonitor"}
API_LABELS = {"app.kubernetes.io/name": "gru-service", "app.kubernetes.io/component": "api"}
REDIS_LABELS = {"app.kubernetes.io/name": "gru-service", "app.kubernetes.io/component": "redis"}

Render = Callable[[str], list[dict[str, Any]]]


def _one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _api(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(resources, "Deployment", "gru-api")


def _container(deployment: dict[str, Any], name: str = "api") -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _settings(resources: list[dict[str, Any]]) -> dict[str, str]:
    """The GRU_ settings the api container reads: its envFrom ConfigMap (name with kustomize's hash)."""
    (source,) = _container(_api(resources))["envFrom"]
    return dict(_one(resources, "ConfigMap", source["configMapRef"]["name"])["data"])


def _pod_specs(resources: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for r in resources:
        if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_kustomize_renders(overlay: str, kustomize: Render) -> None:
    kinds = {r["kind"] for r in kustomize(overlay)}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_core_resources_validate_against_the_kubernetes_schemas(overlay: str, kustomize: Render) -> None:
    import kubernetes_validate

    unvalidated = set()
    for resource in kustomize(overlay):
        if resource["kind"] in CRD_KINDS:
            unvalidated.add(resource["kind"])
            continue
        try:  # strict: an unknown (misspelt, misplaced) field is an error, as `kubectl apply` makes it one
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {error.message} "
                        f"at {'/'.join(map(str, error.path))}")
    assert unvalidated <= CRD_KINDS


def test_strict_validation_rejects_an_unknown_field(kustomize: Render) -> None:
    import kubernetes_validate

    deployment = _api(kustomize("overlays/dev"))
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_healthz_for_liveness_and_startup_and_readyz_for_readiness(
    overlay: str, kustomize: Render
) -> None:
    api = _container(_api(kustomize(overlay)))
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000}
    assert api["args"] == ["--host", "0.0.0.0", "--port", "8000"]
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        assert api[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # Startup gets time to import torch and load the model before liveness may restart the pod.
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_cpu_and_memory_requests_and_limits(overlay: str, kustomize: Render) -> None:
    for name, spec in _pod_specs(kustomize(overlay)):
        for container in spec["containers"]:
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}/{container['name']} {kind}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torch_threads_leave_the_event_loop_one_core_of_the_api_cpu_limit(overlay: str, kustomize: Render) -> None:
    """Unset, torch would start one thread per node core and the container would be throttled; at the limit
    itself, its threads and the event loop fight for the cores (docs/bench.md: 2 threads on 2 cores took
    forwards from 9-14 to 15-25 ms)."""
    resources = kustomize(overlay)
    limit = int(_container(_api(resources))["resources"]["limits"]["cpu"])
    assert int(_settings(resources)["GRU_TORCH_THREADS"]) == max(1, limit - 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_read_only_unprivileged_with_runtime_default_seccomp(
    overlay: str, kustomize: Render
) -> None:
    for name, spec in _pod_specs(kustomize(overlay)):
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 0)) != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile"))
            assert seccomp == {"type": "RuntimeDefault"}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_image_user_matches_the_dockerfile(overlay: str, kustomize: Render, repo: Path) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", (repo / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None
    pod = _api(kustomize(overlay))["spec"]["template"]["spec"]["securityContext"]
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user.groups()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_read_only_root_gets_a_writable_tmp_emptydir(overlay: str, kustomize: Render) -> None:
    deployment = _api(kustomize(overlay))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (tmp,) = [m for m in _container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly")


# Overlays whose memory-store sessions need only outlive a container, not the pod (dev says so).
_POD_LIFETIME_SESSIONS = {"overlays/dev"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_store_sessions_are_snapshotted_where_a_new_pod_finds_them(overlay: str, kustomize: Render) -> None:
    """A memory store keeps its sessions through a restart only by its snapshot (README, "Durability"): the gpu
    overlay set none, so every rollout (Recreate: a new pod), crash or eviction lost every session. The file
    lies on a writable mount (the root is read-only), and one that outlives the pod: a claim, which one pod
    holds at a time (Recreate), since two pods would each write over the other's sessions."""
    resources = kustomize(overlay)
    settings = _settings(resources)
    if settings["GRU_STORE"] != "memory":
        return
    assert "GRU_SNAPSHOT_PATH" in settings, "a memory store without a snapshot"
    directory = str(Path(settings["GRU_SNAPSHOT_PATH"]).parent)
    deployment = _api(resources)
    (mount,) = [m for m in _container(deployment)["volumeMounts"] if m["mountPath"] == directory]
    assert not mount.get("readOnly")
    if overlay in _POD_LIFETIME_SESSIONS:
        return
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    _one(resources, "PersistentVolumeClaim", claim)
    assert deployment["spec"]["strategy"]["type"] == "Recreate" and deployment["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_pause_and_the_drain(overlay: str, kustomize: Render) -> None:
    resources = kustomize(overlay)
    deployment = _api(resources)
    command = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert pause >= 5, "endpoints take a few seconds to drop a terminating pod everywhere"
    drain = float(_settings(resources)["GRU_REQUEST_TIMEOUT_SECONDS"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pause + drain + 10, "preStop pause + longest in-flight chunk + time to snapshot"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_come_from_a_configmap_and_api_keys_from_a_secret(overlay: str, kustomize: Render) -> None:
    from service.config import Settings

    resources = kustomize(overlay)
    settings = _settings(resources)
    for key in settings:
        assert key.startswith("GRU_") and key.removeprefix("GRU_").lower() in Settings.model_fields, key
    (keys,) = [e for e in _container(_api(resources))["env"] if e["name"] == "GRU_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["name"] == "gru-api-keys"
    assert "GRU_API_KEYS" not in settings, "keys never in a ConfigMap"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_covers_the_api_pods_and_lets_nodes_drain(overlay: str, kustomize: Render) -> None:
    resources = kustomize(overlay)
    pdb = _one(resources, "PodDisruptionBudget", "gru-api")
    labels = _api(resources)["spec"]["template"]["metadata"]["labels"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_pods_spread_over_nodes(overlay: str, kustomize: Render) -> None:
    spec = _api(kustomize(overlay))["spec"]["template"]["spec"]
    by_key = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    node = by_key["kubernetes.io/hostname"]
    assert node["maxSkew"] == 1 and _selects(node["labelSelector"]["matchLabels"], API_LABELS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_routes_to_the_api_port(overlay: str, kustomize: Render) -> None:
    resources = kustomize(overlay)
    service = _one(resources, "Service", "gru-api")
    assert _selects(service["spec"]["selector"], _api(resources)["spec"]["template"]["metadata"]["labels"])
    expected = {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    assert service["spec"]["ports"] == [expected]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_carry_prometheus_scrape_annotations_for_the_metrics_port(
    overlay: str, kustomize: Render
) -> None:
    annotations = _api(kustomize(overlay))["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                           "prometheus.io/path": "/metrics"}


@pytest.mark.parametrize("overlay", ["base", "overlays/prod", "overlays/gpu"])
def test_servicemonitor_scrapes_the_service_metrics_port(overlay: str, kustomize: Render) -> None:
    resources = kustomize(overlay)
    monitor = _one(resources, "ServiceMonitor", "gru-api")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one(resources, "Service", "gru-api")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    for field in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint[field]), field
    if "namespaceSelector" not in monitor["spec"]:  # then it must live beside the Service
        assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")


def test_dev_is_one_replica_on_the_memory_store_and_needs_no_operator(kustomize: Render) -> None:
    resources = kustomize("overlays/dev")
    assert _api(resources)["spec"]["replicas"] == 1
    assert _settings(resources)["GRU_STORE"] == "memory"
    assert not [r for r in resources if r["kind"] in CRD_KINDS]
    assert not [r for r in resources if r["kind"] in ("StatefulSet", "HorizontalPodAutoscaler")]


def test_prod_runs_three_replicas_on_redis_with_an_autoscaler(kustomize: Render) -> None:
    resources = kustomize("overlays/prod")
    deployment = _api(resources)
    settings = _settings(resources)
    assert settings["GRU_STORE"] == "redis"
    url = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", settings["GRU_REDIS_URL"])
    assert url is not None
    redis_service = _one(resources, "Service", url.group(1))
    assert int(url.group(2)) in {p["port"] for p in redis_service["spec"]["ports"]}
    hpa = _one(resources, "HorizontalPodAutoscaler", "gru-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gru-api"}
    assert hpa["spec"]["minReplicas"] == 3 < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and "cpu" in _container(deployment)["resources"]["requests"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_autoscaled_workload_leaves_its_replica_count_to_the_autoscaler(overlay: str, kustomize: Render) -> None:
    """A count in the manifest is applied as it stands: each `kubectl apply` (every release) scaled an HPA's
    12 pods back to it, under the load that had needed them, until the HPA scaled up again."""
    resources = kustomize(overlay)
    for hpa in (r for r in resources if r["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        workload = _one(resources, target["kind"], target["name"])
        assert "replicas" not in workload["spec"], f"{target['name']} is scaled by {hpa['metadata']['name']}"


def test_prod_refuses_to_start_without_api_keys(kustomize: Render) -> None:
    """The Secret is required, and one whose api-keys is empty (GRU_API_KEYS="", no auth) stops the pods."""
    resources = kustomize("overlays/prod")
    (keys,) = [e for e in _container(_api(resources))["env"] if e["name"] == "GRU_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is False
    assert _settings(resources)["GRU_REQUIRE_API_KEYS"] == "true"


def test_prod_redis_is_a_statefulset_with_capped_memory(kustomize: Render) -> None:
    resources = kustomize("overlays/prod")
    redis = _one(resources, "StatefulSet", "gru-redis")
    assert redis["spec"]["serviceName"] == _one(resources, "Service", "gru-redis")["metadata"]["name"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    container = _container(redis, "redis")
    config_volume = next(v for v in redis["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    conf = _one(resources, "ConfigMap", config_volume["configMap"]["name"])["data"]["redis.conf"]
    options = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert options["maxmemory-policy"] == "volatile-lru"
    maxmemory = re.fullmatch(r"(\d+)mb", options["maxmemory"])
    limit = re.fullmatch(r"(\d+)Mi", container["resources"]["limits"]["memory"])
    assert maxmemory and limit
    # The container limit leaves room above maxmemory for buffers and fragmentation.
    assert int(limit.group(1)) >= int(maxmemory.group(1)) * 1.2


def test_prod_networkpolicy_lets_only_api_pods_reach_redis(kustomize: Render) -> None:
    resources = kustomize("overlays/prod")
    policy = _one(resources, "NetworkPolicy", "gru-redis")
    redis_pod = _one(resources, "StatefulSet", "gru-redis")["spec"]["template"]["metadata"]["labels"]
    api_pod = _api(resources)["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], redis_pod)
    assert not _selects(policy["spec"]["podSelector"]["matchLabels"], api_pod)
    assert "Ingress" in policy["spec"]["policyTypes"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespaceSelector or ipBlock: this namespace's api pods only"
    assert _selects(peer["podSelector"]["matchLabels"], api_pod)
    assert not _selects(peer["podSelector"]["matchLabels"], redis_pod)
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_gpu_requests_one_nvidia_gpu_on_gpu_nodes_with_the_cuda_image(kustomize: Render) -> None:
    resources = kustomize("overlays/gpu")
    deployment = _api(resources)
    container = _container(deployment)
    for kind in ("requests", "limits"):
        assert int(container["resources"][kind]["nvidia.com/gpu"]) == 1, kind
    assert re.search(r":[\w.-]*cuda[\w.-]*$", container["image"]), container["image"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert _settings(resources)["GRU_DEVICE"] == "cuda"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_namespace_enforces_the_restricted_pod_security_standard(
    overlay: str, kustomize: Render
) -> None:
    resources = kustomize(overlay)
    namespace = _one(resources, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for r in resources:
        if r["kind"] != "Namespace":
            assert r["metadata"]["namespace"] == namespace["metadata"]["name"], r["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_mounts_a_model_repository_read_only_at_models(overlay: str, kustomize: Render) -> None:
    deployment = _api(kustomize(overlay))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in _container(deployment)["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] and mount["name"] in volumes


def test_prod_replicas_share_one_model_repository_claim(kustomize: Render) -> None:
    resources = kustomize("overlays/prod")
    volumes = {v["name"]: v for v in _api(resources)["spec"]["template"]["spec"]["volumes"]}
    repository = volumes["model-repository"]
    assert "emptyDir" not in repository
    claim = _one(resources, "PersistentVolumeClaim", repository["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# docs/deploy.md, "Memory store sizing", measured with the shipped model: the process before any session, each
# session's state and records (the kept answers on top, capped by GRU_MAX_ANSWER_BYTES), a full
# /v1/predict/batch call's working memory, and what writing a snapshot needs beyond the file itself.
_SIZING = {"process": ("~330 MB before any", 330e6), "session": ("1,300 + 12·F", 1300),
           "batch call": ("steps) about 440 MB", 440e6), "snapshot": ("file's size plus 130 MB", 130e6),
           "snapshot session": ("file of about\n`900 + 12", 900)}
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9, "": 1}


def _bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def _api_containers(kustomize: Render) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """Every container that runs the service, with the GRU_ settings it gets (defaults for the rest)."""
    for overlay in OVERLAYS:
        resources = kustomize(overlay)
        yield overlay, _container(_api(resources)), _settings(resources)
    (runtime,) = [r for r in kustomize("kserve") if r["kind"] == "ServingRuntime"]
    (container,) = runtime["spec"]["containers"]
    yield "kserve", container, {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_the_memory_limit_holds_the_memory_store_at_its_bounds_and_a_full_batch_call(
    repo: Path, kustomize: Render
) -> None:
    """A memory store at GRU_MAX_SESSIONS with its kept answers at GRU_MAX_ANSWER_BYTES, plus a full batch call
    and a snapshot being written at once (a periodic one runs beside the requests), fits the container's
    memory limit: over it, the kernel kills the pod and every session in it is lost."""
    from service.config import Settings

    guide = (repo / "docs" / "deploy.md").read_text()
    for name, (text, _) in _SIZING.items():
        assert text in guide, f"docs/deploy.md no longer gives the {name} figure this test uses: {text!r}"
    size = {name: value for name, (_, value) in _SIZING.items()}
    for where, container, env in _api_containers(kustomize):
        settings = Settings(**{k.removeprefix("GRU_").lower(): v for k, v in env.items()  # keys: from a Secret
                               if k not in ("GRU_DEVICE", "GRU_REDIS_URL", "GRU_REQUIRE_API_KEYS")})
        held = size["process"]
        snapshot = 0.0
        if settings.store == "memory":
            held += settings.max_sessions * size["session"] + settings.max_answer_bytes
            if settings.snapshot_path is not None:
                snapshot = settings.max_sessions * size["snapshot session"] + settings.max_answer_bytes
                snapshot += size["snapshot"]
        need = held + size["batch call"] + snapshot
        limit = _bytes(container["resources"]["limits"]["memory"])
        assert need <= limit, f"{where}: {need / 2**20:.0f} MiB at the bounds, over the {limit / 2**20:.0f} MiB limit"


def _service_links(resources: list[dict[str, Any]]) -> dict[str, str]:
    """The variables the kubelet puts in every container for each Service of the pod's namespace that has a
    cluster IP, unless the pod sets enableServiceLinks: false (Docker-link style: NAME_SERVICE_HOST,
    NAME_SERVICE_PORT[_PORTNAME], NAME_PORT, NAME_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR])."""
    env = {}
    for service in (r for r in resources if r["kind"] == "Service"):
        if service["spec"].get("clusterIP") == "None":
            continue
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ip = "10.96.0.10"
        env[f"{prefix}_SERVICE_HOST"] = ip
        for i, port in enumerate(service["spec"]["ports"]):
            number, proto = port["port"], port.get("protocol", "TCP")
            if i == 0:
                env[f"{prefix}_SERVICE_PORT"] = str(number)
                env[f"{prefix}_PORT"] = f"{proto.lower()}://{ip}:{number}"
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
            link = f"{prefix}_PORT_{number}_{proto}"
            env[link] = f"{proto.lower()}://{ip}:{number}"
            env |= {f"{link}_PROTO": proto.lower(), f"{link}_PORT": str(number), f"{link}_ADDR": ip}
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_container_gets_no_gru_variable_the_service_refuses(overlay: str, kustomize: Render) -> None:
    """The service stops at start (exit 2) on a GRU_ variable that is no setting; the kubelet's service links
    for the gru-api Service (GRU_API_SERVICE_HOST, GRU_API_PORT, ...) are such variables, so every pod
    started once the Service existed would crash-loop."""
    from service.config import unknown_variables

    resources = kustomize(overlay)
    deployment = _api(resources)
    container = _container(deployment)
    env = dict(_settings(resources))
    env |= {e["name"]: e.get("value", "set from a Secret") for e in container.get("env", [])}
    if deployment["spec"]["template"]["spec"].get("enableServiceLinks", True):
        env |= _service_links(resources)
    assert unknown_variables(env) == []


def test_a_rollout_on_gpus_waits_for_no_gpu_the_running_pods_hold(kustomize: Render) -> None:
    """A pod holds its nvidia.com/gpu until it is gone. A rolling update that starts the new pod first (maxSurge
    1, maxUnavailable 0) needs one GPU more than the replicas hold: on a cluster with the gpu overlay's one GPU the
    new pod stays Pending and the old one is kept, so the rollout never ends; and every setting change is one
    (the ConfigMap's name carries a hash). Where a spare GPU exists, two pods on the memory store serve at once,
    each with its own sessions. A GPU deployment replaces its pods: Recreate, or a rolling update without surge."""
    checked = 0
    for overlay in OVERLAYS:
        deployment = _api(kustomize(overlay))
        gpus = int(_container(deployment)["resources"]["limits"].get("nvidia.com/gpu", 0))
        if not gpus:
            continue
        checked += 1
        strategy = deployment["spec"].get("strategy", {})
        surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")  # Kubernetes' default
        assert strategy.get("type") == "Recreate" or surge in (0, "0%"), (overlay, strategy)
    assert checked, "no overlay runs on a GPU: the test checks nothing"
