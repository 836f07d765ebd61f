"""The Dockerfile and .dockerignore, checked by inspection (no Docker daemon in CI).

What a build would prove is checked structurally: two stages, a toolchain only in the builder,
the runtime installs prebuilt wheels with extras that exist, a numeric non-root user, the
`kvcache serve` entrypoint with arguments the real parser accepts, the service's default ports
exposed, nothing secret in the image or the build context.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvcache.config import Config
from kvcache.service.cli import build_parser, serve_config

REPO = Path(__file__).resolve().parents[3]
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|API_?KEY|PRIVATE", re.IGNORECASE)


@dataclass
class Stage:
    """One build stage: its base image, name and instructions (keyword, argument text)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [text for kind, text in self.instructions if kind == keyword]


def _logical_lines(text: str) -> list[str]:
    """Instructions with comments dropped and backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return lines


def _parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile; ARGs before the first FROM substitute into FROM lines."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            arg_name, _, default = rest.partition("=")
            global_args[arg_name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=alias))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return _parse_dockerfile(REPO / "Dockerfile")


def _service_ports() -> set[int]:
    defaults = Config()
    zmq = {int(endpoint.rsplit(":", 1)[1]) for endpoint in defaults.events.zmq_bind}
    return {defaults.http.port, *zmq}


def test_builder_stage_builds_the_wheel_with_a_toolchain(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "expected a multi-stage build"
    builder = next(stage for stage in stages if stage.name == "builder")
    assert builder.base == "python:3.11-slim"
    runs = " ".join(builder.arguments("RUN"))
    assert "build-essential" in runs
    assert re.search(r"\bpip wheel\b", runs)
    assert "--wheel-dir /wheels" in runs


def test_runtime_stage_installs_prebuilt_wheels_with_existing_extras(stages: list[Stage]) -> None:
    runtime = stages[-1]
    assert runtime.name != "builder"
    assert runtime.base == "python:3.11-slim"
    runs = " ".join(runtime.arguments("RUN"))
    # No compiler in the image that runs: everything was compiled by the builder.
    assert "build-essential" not in runs
    assert "gcc" not in runs
    install = next(run for run in runtime.arguments("RUN") if "pip install" in run)
    assert "from=builder" in install
    assert "--no-index" in install
    requirement = next(word for word in shlex.split(install) if word.startswith("kvcache["))
    extras = set(requirement.removeprefix("kvcache[").removesuffix("]").split(","))
    # Every feature a manifest can switch on: pod discovery needs k8s, tracing otel.
    assert extras == {"service", "redis", "hf", "k8s", "otel"}
    builder = " ".join(stages[0].arguments("RUN"))
    assert ".[service,redis,hf,k8s,otel]" in builder  # the wheels the runtime installs
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert extras <= set(pyproject["project"]["optional-dependencies"])


def test_runtime_runs_as_numeric_non_root_user(stages: list[Stage]) -> None:
    runtime = stages[-1]
    users = runtime.arguments("USER")
    assert users, "the runtime stage never leaves root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
    assert uid == "10001"
    assert gid in ("", "10001")
    creates = " ".join(runtime.arguments("RUN"))
    assert "--uid 10001" in creates
    # The user switch comes after every RUN (which may need root) and before the entrypoint.
    order = [kind for kind, _ in runtime.instructions]
    last_user = len(order) - 1 - order[::-1].index("USER")
    assert "RUN" not in order[last_user:]
    assert order.index("ENTRYPOINT") > last_user


def test_entrypoint_is_kvcache_serve_with_arguments_the_parser_accepts(
    stages: list[Stage],
) -> None:
    runtime = stages[-1]
    (entrypoint,) = runtime.arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["kvcache", "serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kvcache"] == "kvcache.service.cli:main"
    (cmd,) = runtime.arguments("CMD")
    argv = [*json.loads(entrypoint)[1:], *json.loads(cmd)]
    config = serve_config(build_parser().parse_args(argv))
    # Reachable from outside the container, with every other setting at its default.
    assert config.http.host == "0.0.0.0"
    assert config.http.port == Config().http.port
    assert config.events == Config().events


def test_exposed_ports_are_the_service_defaults(stages: list[Stage]) -> None:
    exposed = {
        int(port.split("/")[0]) for text in stages[-1].arguments("EXPOSE") for port in text.split()
    }
    assert exposed == _service_ports() == {8080, 5557}


def test_no_secrets_in_build_arguments_or_environment(stages: list[Stage]) -> None:
    # Build arguments and ENV end up in the image's history and config: no credentials there.
    for line in _logical_lines((REPO / "Dockerfile").read_text()):
        keyword, _, rest = line.partition(" ")
        if keyword.upper() in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", rest)
            assert names, line
            assert not [name for name in names if SECRET_NAME.search(name)], line
    for stage in stages:
        for text in stage.arguments("ADD"):
            assert "://" not in text, "ADD of a URL: fetch in a RUN with a checked digest"


# --- .dockerignore --------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax, limited to what .dockerignore uses: `**`, `*`, `?`, literals."""
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out)


def _ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(line.lstrip("!").strip("/"))))
    return rules


def _ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether Docker leaves `path` out: the last matching rule wins; a directory's rule
    covers everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def rules() -> list[tuple[bool, re.Pattern[str]]]:
    return _ignore_rules(REPO / ".dockerignore")


def test_dockerignore_keeps_every_file_the_wheel_build_reads(
    rules: list[tuple[bool, re.Pattern[str]]],
) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"]["readme"]]
    needed += [name for name in ("setup.py", "setup.cfg", "MANIFEST.in") if (REPO / name).exists()]
    sources = [
        path.relative_to(REPO).as_posix()
        for path in (REPO / "src" / "kvcache").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".so", ".pyc")
    ]
    assert "src/kvcache/service/cli.py" in sources
    for path in needed + sources:
        assert not _ignored(rules, path), f"{path} is needed by the build but ignored"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".env",
        ".env.production",
        "deploy/helm/kvcache/values.yaml",
        "certs/server.key",
        "src/kvcache/tls.pem",
        "src/kvcache/index/_kernels.cpython-311-x86_64-linux-gnu.so",
        "src/kvcache/__pycache__/config.cpython-311.pyc",
        "tests/unit/test_config.py",
        "build/lib/kvcache/__init__.py",
        "kvcache.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_keeps_out_secrets_and_local_state(
    rules: list[tuple[bool, re.Pattern[str]]], path: str
) -> None:
    assert _ignored(rules, path)


def test_ignore_matcher_follows_docker_rules() -> None:
    # The matcher above is ours: check it on the cases the real rules rely on.
    rules = [(False, _pattern_regex("tests")), (False, _pattern_regex("**/*.pem"))]
    rules.append((True, _pattern_regex("tests/keep.pem")))
    assert _ignored(rules, "tests/deep/file.py")
    assert _ignored(rules, "a/b/c.pem")
    assert _ignored(rules, "c.pem")
    assert not _ignored(rules, "tests/keep.pem")
    assert not _ignored(rules, "testsuite/file.py")
    assert not _ignored([(False, _pattern_regex("src/*.so"))], "src/a/b.so")
