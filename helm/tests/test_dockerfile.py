"""The Dockerfile at the repository root, read as text (no image is built here):

- the builder runs the same `cargo build` as bench/run (so the image ships the binary the
  benchmarks measure: --release, --locked, the .cargo/config.toml rustflags) on a Rust at least
  Cargo.toml's rust-version;
- .dockerignore keeps build outputs and local environments out, and every file the build reads in;
- the final stage has no shell to run (no shell-form RUN), runs as a fixed non-root uid — the one
  the chart's securityContext names — with stepgate as ENTRYPOINT, so the chart's `serve …`
  arguments work, and a default CMD whose demo policy and keys are in the image.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import yaml

import chart_render
from chart_render import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.image} has no {keyword}"
        return found[-1]


def stages() -> list[Stage]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    result: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, f"FROM {args}"
            result.append(Stage(m.group(1), m.group(2)))
        else:
            assert result, f"{keyword} before the first FROM"
            result[-1].instructions.append((keyword, args))
    return result


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    if not args.startswith("["):
        return None
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value)
    return value


def cargo_build(words: list[str]) -> tuple[set[str], list[str]]:
    """(the options, the packages) of a `cargo build` command line."""
    assert words[:2] == ["cargo", "build"], words
    options, packages, rest = set(), [], iter(words[2:])
    for word in rest:
        if word in ("-p", "--package"):
            packages.append(next(rest))
        elif word.startswith("--package="):
            packages.append(word.split("=", 1)[1])
        else:
            options.add(word)
    return options, packages


def bench_build_command() -> list[str]:
    lines = [
        line.strip()
        for line in (REPO / "bench" / "run").read_text(encoding="utf-8").splitlines()
        if re.match(r"\s*cargo build\b", line)
    ]
    assert len(lines) == 1, f"bench/run should build once, found {lines}"
    return shlex.split(lines[0])


def test_builder_runs_the_benchmarks_cargo_build():
    build = stages()[0]
    runs = [shlex.split(r) for r in build.all("RUN") if r.startswith("cargo build")]
    assert len(runs) == 1, f"the builder stage should run one cargo build, found {build.all('RUN')}"
    docker_options, docker_packages = cargo_build(runs[0])
    bench_options, bench_packages = cargo_build(bench_build_command())
    assert docker_options == bench_options, "the image must be built like the benchmarked binary"
    assert docker_packages == ["stepgate"] and "stepgate" in bench_packages
    assert "--release" in docker_options and "--locked" in docker_options


def test_builder_rust_is_at_least_the_rust_version():
    m = re.fullmatch(r"rust:(\d+)\.(\d+)(?:\.(\d+))?-bookworm", stages()[0].image)
    assert m, f"pin the builder as rust:<version>-bookworm, not {stages()[0].image}"
    floor = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))["package"]["rust-version"]
    assert (int(m.group(1)), int(m.group(2))) >= tuple(int(p) for p in floor.split(".")[:2])


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns (as Docker reads them, `!` exceptions included) drop `path`."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    dropped = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        if any(regex(body).match(prefix) for prefix in prefixes):
            dropped = not negate
    return dropped


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_drops_outputs_and_keeps_sources():
    patterns = dockerignore_patterns()
    for path in ["target/debug/stepgate", ".venv/bin/python", "examples/clients/node/node_modules/x.js", "fuzz/target/x"]:
        assert ignored(path, patterns), f"{path} should not be sent to the Docker build"
    # What `cargo build` reads: the workspace manifests, the rustflags, build.rs and protos, and
    # the files the code includes at compile time.
    needed = [
        "Cargo.toml", "Cargo.lock", ".cargo/config.toml", "build.rs", "proto/stepgate/v1/decision.proto",
        "src/main.rs", "benches/engine.rs", "examples/stepgate.yaml", "examples/demo-keys/jwks.json",
        "docs/policy.md",
    ]
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))
    needed += [f"{member}/Cargo.toml" for member in cargo["workspace"]["members"]]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not ignored(path, patterns), f".dockerignore drops {path}, which the build needs"
    assert [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY . ")], (
        "the builder copies the build context (filtered by .dockerignore)"
    )


def test_runtime_stage_has_no_shell_and_runs_as_the_charts_user():
    final = stages()[-1]
    assert final.image.startswith("gcr.io/distroless/") and final.image.endswith(":nonroot")
    shell_runs = [r for r in final.all("RUN") if exec_form(r) is None]
    assert not shell_runs, f"the runtime image has no shell: RUN {shell_runs}"
    user = final.last("USER").split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user), "USER must be a numeric, non-root uid"
    chart = chart_render.template({})
    pod = chart.one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert int(user[0]) == pod["runAsUser"] and int(user[1]) == pod["runAsGroup"]
    exposed = {int(p.split("/")[0]) for line in final.all("EXPOSE") for p in line.split()}
    assert exposed == {50051, 9464}


def test_entrypoint_is_stepgate_so_the_chart_args_work():
    final = stages()[-1]
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    assert entrypoint == ["/stepgate"]
    copied = [c for c in final.all("COPY") if c.startswith("--from=")]
    assert any(c.split()[1:] == ["/src/target/release/stepgate", "/stepgate"] for c in copied), copied
    chart = chart_render.template({})
    container = chart.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container and container["args"][0] == "serve"
    # Nor do the `helm test` pod and the policy check's Job: the same entrypoint runs their args.
    for hook in chart.hooks:
        spec = hook["spec"]["template"]["spec"] if hook["kind"] == "Job" else hook.get("spec")
        if spec:
            assert "command" not in spec["containers"][0], hook["metadata"]["name"]


def test_exec_probes_run_the_images_stepgate():
    # With TLS the probes exec the binary directly (no shell in the image): it must be where the
    # image puts it.
    entrypoint = exec_form(stages()[-1].last("ENTRYPOINT"))
    values = yaml.safe_load((REPO / "helm" / "tests" / "values" / "tls-cert-manager.yaml").read_text(encoding="utf-8"))
    container = chart_render.template(values).one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == entrypoint[0] and command[1] == "health", probe


def test_default_command_serves_the_bundled_demo_policy():
    final = stages()[-1]
    cmd = exec_form(final.last("CMD"))
    assert cmd and cmd[0] == "serve"
    destinations = {}
    for copy in final.all("COPY"):
        if copy.startswith("--from="):
            continue
        source, destination = copy.split()
        destinations[destination] = REPO / source
    config = cmd[cmd.index("--config") + 1]
    assert config in destinations, f"--config {config} is not copied into the image"
    policy = yaml.safe_load(destinations[config].read_text(encoding="utf-8"))
    for issuer in policy["issuers"]:
        if "jwks_file" in issuer:
            # stepgate reads jwks_file relative to the policy file.
            key_set = str(PurePosixPath(config).parent / issuer["jwks_file"])
            assert key_set in destinations, f"{issuer['id']}: {key_set} is not in the image"
    assert not any(fnmatch.fnmatch(d, "*private*") for d in destinations), "no private demo key in the image"
    listen = cmd[cmd.index("--listen") + 1]
    assert listen.startswith("0.0.0.0:") or listen.startswith("[::]:"), "reachable from outside the container"
    # Demo keys beyond loopback only when the one running the image says so (the environment):
    # an image run without the chart's arguments must not trust tokens anyone can mint.
    assert "--allow-demo-keys" not in cmd
    assert not any(env.startswith("STEPGATE_ALLOW_DEMO_KEYS") for env in final.all("ENV"))
