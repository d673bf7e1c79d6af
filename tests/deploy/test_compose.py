"""docker-compose.yml, its scale profile and the GPU override, through the real `docker-compose config`.

Debian's docker-compose 1.29 prints every service whatever `--profile` says, so the profile membership
is checked on the `profiles:` entries themselves.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

GPU = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]


def _compose_env(**extra: str) -> dict[str, str]:
    """The caller's environment without the variables the compose files read, so results are stable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GRU_", "COMPOSE_", "GRAFANA_", "TORCH_VARIANT"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def compose(repo: Path, tool: Callable[[str], str]) -> Callable[..., dict[str, Any]]:
    binary = tool("docker-compose")
    seen: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], str] = {}

    def config(*args: str, **env: str) -> dict[str, Any]:
        key = (args, tuple(sorted(env.items())))
        if key not in seen:  # each run costs about a second
            done = subprocess.run([binary, *args, "config"], cwd=repo, env=_compose_env(**env),
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            seen[key] = done.stdout
        return yaml.safe_load(seen[key])

    return config


@pytest.mark.parametrize("args", [[], ["--profile", "scale"], GPU, [*GPU, "--profile", "scale"]],
                         ids=["default", "scale", "gpu", "gpu+scale"])
def test_compose_config_is_valid(args: list[str], repo: Path, tool: Callable[[str], str]) -> None:
    done = subprocess.run([tool("docker-compose"), *args, "config", "-q"], cwd=repo, env=_compose_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr


def test_compose_files_have_no_name_or_version_key(repo: Path) -> None:
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        top = yaml.safe_load((repo / name).read_text())
        assert "name" not in top and "version" not in top, name


def test_default_stack_is_api_prometheus_grafana_and_scale_adds_redis_replica_nginx(
    compose: Callable[..., dict[str, Any]],
) -> None:
    services = compose()["services"]
    always = {name for name, s in services.items() if not s.get("profiles")}
    scale = {name for name, s in services.items() if "scale" in s.get("profiles", [])}
    assert always == {"api", "prometheus", "grafana"}
    assert scale == {"redis", "api-2", "api-3", "nginx"}
    assert always | scale == set(services)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> set[tuple[int, int]]:
    out = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.add((int(port["published"]), int(port["target"])))
        else:
            published, _, target = str(port).rpartition(":")
            out.add((int(published.rpartition(":")[2]), int(target)))
    return out


Compose = Callable[..., dict[str, Any]]


def test_api_builds_here_serves_8000_restarts_and_checks_readyz(compose: Compose) -> None:
    api = compose()["services"]["api"]
    assert Path(api["build"]["context"]).resolve() == Path(__file__).resolve().parents[2]
    assert api["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert (8000, 8000) in _published(api)
    assert api["restart"] in ("unless-stopped", "always", "on-failure")
    # The image's check, which asks /readyz on GRU_PORT (tests/deploy/test_healthcheck.py runs it).
    assert api["healthcheck"]["test"] == ["CMD", "python", "-m", "service.healthcheck"]
    env = _env(api)
    assert env["GRU_STORE"] == "memory"
    assert all(key.startswith("GRU_") for key in env)


def test_every_gru_setting_in_compose_is_one_the_service_reads(compose: Compose) -> None:
    from service.config import Settings

    known = set(Settings.model_fields)
    for name in ("api", "api-2", "api-3"):
        for key in _env(compose()["services"][name]):
            assert key.removeprefix("GRU_").lower() in known, f"{name}: {key} is not a Settings field"


@pytest.mark.parametrize("environment", [{}, {"GRU_STORE": "redis"}], ids=["plain", "GRU_STORE set"])
def test_scale_profile_balances_only_replicas_on_redis_whatever_the_environment(
    environment: dict[str, str], compose: Compose
) -> None:
    """Every replica behind nginx keeps its sessions in Redis, and `api` in its memory store, however the
    profile is started: a replica with a store of its own behind the balancer would split a session's
    steps between two states without an error (the profile once needed GRU_STORE=redis set by hand)."""
    services = compose("--profile", "scale", **environment)["services"]
    assert _env(services["api"])["GRU_STORE"] == "memory"
    per_replica = {"GRU_STORE", "GRU_SNAPSHOT_PATH", "GRU_SNAPSHOT_INTERVAL_SECONDS"}
    for name in ("api-2", "api-3"):
        env = _env(services[name])
        assert env["GRU_STORE"] == "redis", name
        assert re.fullmatch(r"redis://redis:6379/\d+", env["GRU_REDIS_URL"]), name
        # the same image and settings as api, bar what is per-replica
        assert services[name]["image"] == services["api"]["image"]
        assert {k: v for k, v in _env(services["api"]).items() if k not in per_replica} == {
            k: v for k, v in env.items() if k not in per_replica}
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def _redis_options(compose: Compose) -> dict[str, str]:
    command = compose()["services"]["redis"]["command"]
    words = command if isinstance(command, list) else command.split()
    assert words[0] == "redis-server"
    options = dict(zip(words[1::2], words[2::2], strict=True))
    assert all(name.startswith("--") for name in options), words
    return options


def test_redis_caps_memory_and_evicts_least_recently_used_sessions(compose: Compose) -> None:
    options = _redis_options(compose)
    assert options["--maxmemory"] == "512mb"
    assert options["--maxmemory-policy"] == "volatile-lru"


def test_redis_keeps_sessions_in_an_append_only_file_fsynced_every_second_on_a_named_volume(
    compose: Compose,
) -> None:
    """As the prod overlay's Redis: a restart of Redis keeps every session (tests/deploy/test_redis_durability.py
    restarts a redis-server started with these very options)."""
    options = _redis_options(compose)
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--save"] == ""
    redis = compose()["services"]["redis"]
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in redis["volumes"]]
    assert f"redis-data:{options['--dir']}" in [":".join(v.split(":")[:2]) for v in volumes]
    assert "redis-data" in compose()["volumes"]


def test_redis_persistence_is_the_prod_overlays(compose: Compose, repo: Path) -> None:
    options = _redis_options(compose)
    conf = (repo / "deploy" / "k8s" / "overlays" / "prod" / "redis.conf").read_text()
    prod = dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))
    for name in ("maxmemory", "maxmemory-policy", "appendonly", "appendfsync"):
        assert options[f"--{name}"] == prod[name], name
    assert prod["save"] == '""' and options["--save"] == ""


def test_nginx_fronts_the_redis_replicas_with_the_shipped_config(
    compose: Callable[..., dict[str, Any]], repo: Path
) -> None:
    nginx = compose()["services"]["nginx"]
    assert (8080, 8080) in _published(nginx)
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in nginx["volumes"]]
    target = f"{repo}/deploy/nginx/gru-api.conf:/etc/nginx/conf.d/default.conf"
    assert any(m.startswith(target) for m in mounts)
    conf = (repo / "deploy" / "nginx" / "gru-api.conf").read_text()
    # The name nginx resolves is the alias of exactly the Redis replicas, never of `api` (memory store).
    (target,) = re.findall(r"^\s*set\s+\$gru_replicas\s+([\w.-]+):(\d+);", conf, re.MULTILINE)
    services = compose()["services"]
    named = {name for name, service in services.items()
             if target[0] in service.get("networks", {}).get("default", {}).get("aliases", [])}
    assert named == {"api-2", "api-3"}
    assert all(_env(services[name])["GRU_STORE"] == "redis" for name in named)
    assert target[1] == "8000"
    assert set(nginx["depends_on"]) == {"api-2", "api-3"}


def test_nginx_resolves_the_replicas_through_dockers_dns_at_request_time(repo: Path) -> None:
    """A name in a variable is resolved with `resolver` when a request needs it; one written straight into
    proxy_pass or an upstream block would be resolved once, at start (a re-created replica then gets 502s)."""
    conf = (repo / "deploy" / "nginx" / "gru-api.conf").read_text()
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\s+valid=\d+s", conf, re.MULTILINE)
    assert re.findall(r"^\s*proxy_pass\s+(\S+);", conf, re.MULTILINE) == ["http://$gru_replicas"]
    assert not re.search(r"^\s*upstream\s", conf, re.MULTILINE)


def test_every_replica_shares_the_name_prometheus_discovers(
    compose: Callable[..., dict[str, Any]], repo: Path
) -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load((repo / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "gru-api")
    (sd,) = job["dns_sd_configs"]
    assert sd["port"] == 8000
    for name in ("api", "api-2", "api-3"):
        assert set(sd["names"]) <= set(services[name]["networks"]["default"]["aliases"]), name


def test_every_replica_mounts_the_one_model_repository_volume(compose: Callable[..., dict[str, Any]]) -> None:
    config = compose()
    for name in ("api", "api-2", "api-3"):
        volumes = config["services"][name]["volumes"]
        mounts = [v for v in volumes if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/models"]
        assert len(mounts) == 1, name
        mount = mounts[0]
        source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
        read_only = mount.get("read_only") if isinstance(mount, dict) else mount.endswith(":ro")
        assert source == "model-repository" and read_only, name
    assert "model-repository" in config["volumes"]


def test_prometheus_and_grafana_mount_their_own_directories(
    compose: Callable[..., dict[str, Any]], repo: Path
) -> None:
    services = compose()["services"]

    def binds(name: str) -> dict[str, str]:
        out = {}
        for volume in services[name]["volumes"]:
            source, target = (volume.split(":")[:2] if isinstance(volume, str)
                              else (volume["source"], volume["target"]))
            if source.startswith("/"):
                out[target] = source
        return out

    assert binds("prometheus") == {"/etc/prometheus": f"{repo}/deploy/prometheus"}
    assert binds("grafana") == {
        "/etc/grafana/provisioning": f"{repo}/deploy/grafana/provisioning",
        "/var/lib/grafana/dashboards": f"{repo}/deploy/grafana/dashboards",
    }
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert (9090, 9090) in _published(services["prometheus"])
    assert (3000, 3000) in _published(services["grafana"])


def test_gpu_override_reserves_an_nvidia_gpu_and_builds_cuda_torch(compose: Compose) -> None:
    services = compose(*GPU)["services"]
    api = services["api"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert re.fullmatch(r"cu\d+", api["build"]["args"]["TORCH_VARIANT"])
    assert api["image"] != services["api-2"]["image"], "the CUDA image must not overwrite the CPU tag"
    env = _env(api)
    assert env["GRU_DEVICE"] == "cuda"
    # The override merges into the api: settings it does not name stay.
    assert env["GRU_MAX_SESSIONS"] == _env(compose()["services"]["api"])["GRU_MAX_SESSIONS"]
    assert "profiles" not in api
