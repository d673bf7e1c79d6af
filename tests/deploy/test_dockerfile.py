"""The Dockerfile and its build context: hadolint-clean, multi-stage, non-root, baked model, /readyz check."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from service.healthcheck import TIMEOUT_SECONDS
from tests.deploy.dockerfile import Instruction, final, read_instructions


@pytest.fixture(scope="module")
def instructions(repo: Path) -> list[Instruction]:
    return read_instructions(repo / "Dockerfile")


def test_dockerfile_passes_hadolint_at_warning_threshold(repo: Path, tool: Callable[[str], str]) -> None:
    done = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "warning", "--format", "json", "Dockerfile"],
        cwd=repo, capture_output=True, text=True, timeout=60, check=False,
    )
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0, f"hadolint findings: {json.dumps(findings, indent=1)}\n{done.stderr}"
    assert [f for f in findings if f["level"] in ("error", "warning")] == []


def test_image_is_built_in_stages_on_slim_python_311(instructions: list[Instruction]) -> None:
    froms = [args for _, kw, args in instructions if kw == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for _, kw, a in instructions if kw == "ARG" and "=" in a}
    def expand(image: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)

    images = [expand(f.split()[0]) for f in froms]
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", image) for image in images), images
    # The runtime stage takes the installed environment from the build stage, not from a fresh pip install.
    assert any(a.startswith("--from=build") for a in final(instructions, "COPY"))
    assert not any("pip install" in a for a in final(instructions, "RUN"))


def _runs(instructions: list[Instruction]) -> list[str]:
    return [args for _, kw, args in instructions if kw == "RUN"]


def test_dependencies_come_from_the_lock_hash_checked_before_torch_and_the_package(
    instructions: list[Instruction],
) -> None:
    runs = _runs(instructions)
    lock = next(i for i, r in enumerate(runs) if "-r requirements.lock" in r)
    assert re.fullmatch(r"pip install --no-cache-dir --require-hashes --no-deps -r requirements\.lock", runs[lock])
    torch = next(i for i, r in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in r)
    package = next(i for i, r in enumerate(runs) if re.search(r"pip install .* \.( |$)", r))
    # torch after the lock: its own dependencies are then the lock's versions, not whatever its index has.
    assert lock < torch < package
    # The package itself adds nothing: no dependency, no build environment fetched; pip check proves it whole.
    assert "--no-deps" in runs[package] and "--no-build-isolation" in runs[package]
    assert "-e " not in runs[package], "non-editable, so model/ and its weights land in site-packages"
    assert "pip check" in runs[package]
    assert "requirements.lock constraints.txt ./" in [a for _, kw, a in instructions if kw == "COPY"]


def test_torch_is_the_cpu_build_by_default_at_the_constraints_version(
    instructions: list[Instruction], repo: Path
) -> None:
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for _, kw, a in instructions if kw == "ARG" and "=" in a}
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    torch_install = next(r for r in _runs(instructions) if '--index-url "${TORCH_INDEX_URL}"' in r)
    # The torch version is read from constraints.txt at build time: run the very expression on the file.
    (expression,) = re.findall(r"\$\((sed [^)]*)\)", torch_install)
    done = subprocess.run(["sh", "-c", expression], cwd=repo, capture_output=True, text=True, check=True)
    pinned = [line.split("==", 1)[1] for line in (repo / "constraints.txt").read_text().splitlines()
              if line.startswith("torch==")]
    assert len(pinned) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", pinned[0])
    assert done.stdout.strip() == pinned[0]


def test_cuda_images_get_the_c_compiler_triton_builds_its_launcher_with(instructions: list[Instruction]) -> None:
    # ARGs are scoped to their stage: the runtime stage must declare TORCH_VARIANT to see the build arg.
    assert "TORCH_VARIANT=cpu" in final(instructions, "ARG")
    (install,) = [run for run in final(instructions, "RUN") if "gcc" in run]
    assert re.search(r'if \[ "\$\{TORCH_VARIANT\}" != "cpu" \]; then', install), "CPU images stay without gcc"
    assert "libc6-dev" in install and "rm -rf /var/lib/apt/lists/*" in install
    # Its kernel cache must be writable where the root filesystem is read-only (the k8s manifests): /tmp.
    env = " ".join(final(instructions, "ENV"))
    assert re.search(r"\bTRITON_CACHE_DIR=/tmp/", env), env


def test_shipped_model_is_baked_in_as_package_data(instructions: list[Instruction], repo: Path) -> None:
    copies = [a for _, kw, a in instructions if kw == "COPY"]
    assert "model ./model" in copies and "service ./service" in copies
    pyproject = (repo / "pyproject.toml").read_text()
    assert 'model = ["weights/default/*"]' in pyproject, "the weights must be package data to be installed"


def _build_check(instructions: list[Instruction]) -> tuple[str, str]:
    """(working directory, command) of the build stage's check that the installed service loads its model."""
    workdir = "/"
    for stage, kw, args in instructions:
        if stage == 0 and kw == "WORKDIR":
            workdir = args
        if stage == 0 and kw == "RUN" and "Settings().model_path" in args:
            return workdir, args
    raise AssertionError("no build-time check of the installed model")


def test_build_check_runs_where_the_source_tree_is_not_importable(instructions: list[Instruction]) -> None:
    workdir, command = _build_check(instructions)
    copied_to = {args.split()[-1].removeprefix("./") for stage, kw, args in instructions
                 if stage == 0 and kw == "COPY" and not args.startswith("--from")}
    assert workdir not in ("/src", "/src/"), "in /src, `import service` finds the source tree, not site-packages"
    assert {"model", "service"} <= copied_to
    assert re.match(r"python -I -c ", command), "isolated mode: neither the directory nor PYTHONPATH is searched"


def test_build_check_fails_when_only_the_source_tree_has_the_model(
    instructions: list[Instruction], tmp_path: Path
) -> None:
    """The check's own code, run from a directory whose `service` and `model` are decoys that fail to import:
    it passes by importing the installed package (here: the venv's), and the same code without -I, as the
    check once ran in /src, picks up the decoys. So a build whose site-packages lacked the model would fail."""
    _, command = _build_check(instructions)
    code = shlex.split(command)[3]
    for package in ("service", "model"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('imported from the working directory')\n")
    isolated = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, check=False)
    assert isolated.returncode == 0, isolated.stderr
    assert isolated.stdout.startswith("model at ")
    plain = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False)
    assert plain.returncode != 0 and "imported from the working directory" in plain.stderr


def test_runs_python_m_service_as_a_numeric_non_root_user(instructions: list[Instruction]) -> None:
    users = final(instructions, "USER")
    assert users, "the runtime stage must switch user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit()), users[-1]
    assert json.loads(final(instructions, "ENTRYPOINT")[-1]) == ["python", "-m", "service"]
    assert "8000" in final(instructions, "EXPOSE")


def test_the_account_is_a_regular_one_since_its_uid_is_above_the_system_range(
    instructions: list[Instruction],
) -> None:
    """useradd --system with uid 10001 warns (SYS_UID_MAX is 999): the account is created as a regular one."""
    users = final(instructions, "USER")
    uid, _, gid = users[-1].partition(":")
    (create,) = [run for run in final(instructions, "RUN") if "useradd" in run]
    assert "--system" not in create
    assert re.search(rf"useradd .*--uid {uid} --gid {gid} ", create)
    assert re.search(rf"groupadd --gid {gid} ", create)


def test_the_port_is_left_to_gru_port_so_the_healthcheck_reads_the_same(instructions: list[Instruction]) -> None:
    """The image passes no --port: the service then listens on GRU_PORT, the setting the healthcheck reads, so
    a container started with another GRU_PORT is still healthy (tests/deploy/test_healthcheck.py runs it)."""
    cmd = json.loads(final(instructions, "CMD")[-1])
    assert cmd == ["--host", "0.0.0.0"]
    (check,) = final(instructions, "HEALTHCHECK")
    assert re.search(r"--start-period=\d+s", check)
    timeout = int(re.search(r"--timeout=(\d+)s", check).group(1))  # type: ignore[union-attr]
    assert json.loads(check[check.index("CMD") + 3:].strip()) == ["python", "-m", "service.healthcheck"]
    assert timeout > TIMEOUT_SECONDS, "the check must give up before Docker kills it"


def test_no_syntax_directive_so_the_build_fetches_no_frontend_image(repo: Path) -> None:
    first = (repo / "Dockerfile").read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first


def test_the_docs_name_the_base_image_the_dockerfile_uses(instructions: list[Instruction], repo: Path) -> None:
    (default,) = [a.split("=", 1)[1] for _, kw, a in instructions if kw == "ARG" and a.startswith("PYTHON_IMAGE=")]
    for doc in ("README.md", "docs/deploy.md"):
        named = set(re.findall(r"`(python:3\.11[\w.-]*)`", (repo / doc).read_text()))
        assert named == {default}, f"{doc} names {named}"


# --- .dockerignore ------------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (moby/patternmatcher): `*` and `?` stay within a path segment, `**`
    spans segments; a pattern also excludes everything under a directory it matches."""
    pattern = pattern.strip("/")
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + "(?:/.*)?")


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    included = True
    for negated, regex in rules:  # the last matching rule decides
        if regex.fullmatch(path):
            included = negated
    return included


@pytest.fixture(scope="module")
def dockerignore(repo: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (repo / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _dockerignore_regex(line.lstrip("!"))))
    return rules


@pytest.mark.parametrize("path", [
    "pyproject.toml", "constraints.txt", "README.md", "service/__main__.py", "service/api/v1.py",
    "model/gru.py", "model/weights/default/config.json", "model/weights/default/model.safetensors",
])
def test_build_context_holds_the_package_and_shipped_model(
    path: str, dockerignore: list[tuple[bool, re.Pattern[str]]]
) -> None:
    assert _in_context(path, dockerignore)


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench/__main__.py", "harness/processes.py",
    "docker-compose.yml",
    "deploy/k8s/base/deployment.yaml", "model/weights/experiment-3/model.safetensors",
    "service/__pycache__/app.cpython-311.pyc", ".mypy_cache/3.11/x.json", "runs/train.log",
])
def test_build_context_leaves_out_venv_git_tests_and_other_runs(
    path: str, dockerignore: list[tuple[bool, re.Pattern[str]]]
) -> None:
    assert not _in_context(path, dockerignore)


def test_every_file_the_dockerfile_copies_reaches_the_build_context(
    instructions: list[Instruction], dockerignore: list[tuple[bool, re.Pattern[str]]], repo: Path
) -> None:
    for _, kw, args in instructions:
        if kw != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (repo / source).exists(), f"COPY {source}: not in the repository"
            assert _in_context(source, dockerignore), f"COPY {source}: excluded by .dockerignore"


def test_build_context_alone_builds_a_package_with_the_service_and_the_shipped_model(
    dockerignore: list[tuple[bool, re.Pattern[str]]], repo: Path, tmp_path: Path
) -> None:
    """What `pip install .` sees in the image: only the files .dockerignore lets through."""
    context = tmp_path / "context"
    for directory, subdirs, files in os.walk(repo):
        subdirs[:] = [d for d in subdirs if d not in {".git", ".venv", "__pycache__", ".mypy_cache", "build"}]
        for name in files:
            relative = (Path(directory) / name).relative_to(repo)
            if _in_context(relative.as_posix(), dockerignore):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / relative, context / relative)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("gru_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"service/__main__.py", "service/config.py", "model/__init__.py"} <= names
    shipped = sorted((repo / "model" / "weights" / "default").glob("*"))
    if not shipped:
        pytest.skip("model/weights/default is not there yet (make model trains it)")
    for path in shipped:
        assert f"model/weights/default/{path.name}" in names
