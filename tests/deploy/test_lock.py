"""requirements.lock and requirements-dev.lock: complete, hash-pinned, consistent, and what `make` installs.

The image installs requirements.lock with --require-hashes; `make serve` and `make test` build .venv from the
same versions (tests/deploy/test_dockerfile.py pins the Dockerfile's side).
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# Not in the lock: each TORCH_VARIANT is another file (tests/deploy/test_dockerfile.py), pinned in constraints.txt.
UNLOCKED = {"torch"}

# Where the environment's packages are: not the whole sys.path, where setuptools, once imported, adds the
# dist-info of the packages it vendors (an older packaging among them).
SITE_PACKAGES = sysconfig.get_paths()["purelib"]

_ENTRY = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)((?:\s*\\\n\s+--hash=\S+)+)", re.MULTILINE)


def _read_lock(name: str) -> dict[str, tuple[str, set[str]]]:
    """package -> (version, hashes) of a lock file; every requirement line must be one of these entries."""
    text = (REPO / name).read_text()
    entries = {canonicalize_name(m[1]): (m[2], set(re.findall(r"--hash=(\S+)", m[3]))) for m in _ENTRY.finditer(text)}
    pinned_lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(pinned_lines) == len(entries), f"{name}: a requirement without version or hashes"
    return entries


@pytest.fixture(scope="module")
def runtime_lock() -> dict[str, tuple[str, set[str]]]:
    return _read_lock("requirements.lock")


@pytest.fixture(scope="module")
def dev_lock() -> dict[str, tuple[str, set[str]]]:
    return _read_lock("requirements-dev.lock")


def _image_requirements() -> list[Requirement]:
    """What the image installs: the package with its redis extra (the Dockerfile's `.[redis]` once was)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["redis"]]


def test_every_runtime_dependency_is_locked_within_pyprojects_range(
    runtime_lock: dict[str, tuple[str, set[str]]],
) -> None:
    for requirement in _image_requirements():
        name = canonicalize_name(requirement.name)
        if name in UNLOCKED:
            continue
        assert name in runtime_lock, f"{name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        version, _ = runtime_lock[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} vs {requirement}"


def test_every_locked_package_carries_sha256_hashes(
    runtime_lock: dict[str, tuple[str, set[str]]], dev_lock: dict[str, tuple[str, set[str]]]
) -> None:
    for lock in (runtime_lock, dev_lock):
        for name, (_, hashes) in lock.items():
            assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_runtime_lock_is_the_cpu_set_without_torch(runtime_lock: dict[str, tuple[str, set[str]]]) -> None:
    """No torch (its variant's index supplies it) and none of the CUDA build's wheels, which only a CUDA torch
    pulls in, at the versions it pins itself: a CPU image installs nothing from NVIDIA."""
    assert not UNLOCKED & set(runtime_lock)
    assert not [name for name in runtime_lock if name.startswith("nvidia-") or name == "triton"]


def test_the_runtime_lock_holds_every_dependency_of_every_dependency(
    runtime_lock: dict[str, tuple[str, set[str]]],
) -> None:
    """Walked through the installed packages' metadata (this environment has the lock's versions): whatever
    the image's requirements need on this platform, transitively and with the extras asked for, is locked,
    so `pip install --no-deps -r requirements.lock` leaves nothing out. torch's own dependencies included."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in _image_requirements()
            if r.marker is None or r.marker.evaluate()]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        assert name in runtime_lock or name in UNLOCKED, f"{name} is needed but not in requirements.lock"
        (distribution,) = metadata.distributions(name=name, path=[SITE_PACKAGES])
        if name in runtime_lock:
            assert distribution.version == runtime_lock[name][0], f"{name}: this environment is not the lock's"
        for text in distribution.requires or []:
            requirement = Requirement(text)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))
            if wanted:
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    assert len(seen) > 20


def test_the_dev_lock_has_the_runtime_locks_versions_and_hashes(
    runtime_lock: dict[str, tuple[str, set[str]]], dev_lock: dict[str, tuple[str, set[str]]]
) -> None:
    """The tests run on exactly the versions the image ships."""
    for name, entry in runtime_lock.items():
        assert dev_lock.get(name) == entry, name


def test_this_environment_was_installed_from_the_dev_lock(dev_lock: dict[str, tuple[str, set[str]]]) -> None:
    """`make test` runs in .venv built from requirements-dev.lock: every locked version is the installed one
    (a run outside `make`'s environment fails here, saying which package differs)."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions(path=[SITE_PACKAGES])}
    different = {name: (version, installed.get(name)) for name, (version, _) in dev_lock.items()
                 if installed.get(name) != version}
    assert different == {}, "locked vs installed; `make lint` reinstalls from the locks"


def _dry_run(target: str, make: str) -> str:
    done = subprocess.run([make, "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("target", "lock"), [(".venv/.runtime", "requirements.lock"),
                                              (".venv/.dev", "requirements-dev.lock")])
def test_make_installs_its_venv_from_the_lock_hash_checked(
    target: str, lock: str, tool: Callable[[str], str]
) -> None:
    recipe = _dry_run(target, tool("make")).splitlines()
    lock_install = next(i for i, line in enumerate(recipe) if f"-r {lock}" in line)
    assert re.search(rf"pip install -q --require-hashes --no-deps -r {re.escape(lock)}$", recipe[lock_install])
    # torch and the package come after, with everything else already there; pip check then proves it whole.
    package = next(i for i, line in enumerate(recipe) if re.search(r"pip install .* -e ", line))
    assert lock_install < package and "-c constraints.txt" in recipe[package]
    assert any(line.endswith("pip check") for line in recipe[package:])


def test_make_lock_refreshes_both_locks_with_hashes_from_pyproject(tool: Callable[[str], str]) -> None:
    commands = [line for line in _dry_run("lock", tool("make")).splitlines() if "uv pip compile" in line]
    assert len(commands) == 2
    runtime, dev = commands
    for command in commands:
        assert "pyproject.toml" in command and "--generate-hashes" in command and "--upgrade" in command
        assert "--no-emit-package torch" in command and "-c constraints.txt" in command
    assert "--extra redis" in runtime and runtime.endswith("-o requirements.lock")
    assert "--extra dev -c requirements.lock" in dev and dev.endswith("-o requirements-dev.lock")
