"""Lint and render helm/stepgate with Helm 4 as a library (PyPI helm-python-sdk).

helm-python-sdk binds libhelm_c, Helm's Go SDK compiled into a shared library inside the wheel:
no helm binary, no plugin, nothing fetched at test time. Rendering goes through Helm's install
action as a client-side dry run, which is what `helm template` runs, so the values schema is
enforced exactly as `helm install` and `helm template` enforce it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:
    import helm_python
    from helm_python import _native
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "helm-python-sdk is not installed: pip install -r helm/tests/requirements.txt "
        "(or run ./scripts/setup-peers)"
    ) from e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "stepgate"
KUBE_VERSION = "v1.34.0"


class HelmError(Exception):
    """Helm refused the chart or its values; the message is Helm's."""


@dataclass
class Rendered:
    """What `helm template` prints for one release: objects, hooks and NOTES.txt."""

    manifests: list[dict[str, Any]]
    hooks: list[dict[str, Any]]
    notes: str
    release: str
    namespace: str
    sources: dict[str, str] = field(default_factory=dict)

    def all(self) -> list[dict[str, Any]]:
        return self.manifests + self.hooks

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.manifests if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a mapping that repeats a key: YAML parsers disagree on which one wins."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]


def lint(values: dict[str, Any] | None) -> list[str]:
    """`helm lint --strict` of the chart with these values: the errors and warnings it reports."""
    report = helm_python.lint(CHART, values or {}, strict=True, kube_version=KUBE_VERSION)
    # Severity 1 is informational ("icon is recommended"); 2 is a warning, 3 an error.
    findings = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    # `errors` repeats the messages of severity 3; keep any that is not among them.
    messages = {m["error"] for m in report["messages"]}
    return findings + [e for e in report["errors"] if e not in messages]


def _install_dry_run(values: dict[str, Any], release: str, namespace: str, api_versions: list[str]) -> dict:
    # Config.install in helm-python-sdk 0.2.2 does not pass api_versions and kube_version, though
    # libhelm_c's install options take them (`helm template --api-versions --kube-version`); the
    # ServiceMonitor is rendered only when the cluster serves its API, so call it directly.
    options = {
        "namespace": namespace,
        "dry_run": "client",
        "kube_version": KUBE_VERSION,
        "api_versions": api_versions,
    }
    with helm_python.Config(namespace=namespace) as config:
        try:
            payload = _native.call_string(
                "helm_install",
                config._raw(),
                _native.HANDLE(0),
                _native.HANDLE(0),
                str(CHART),
                release,
                json.dumps(values),
                json.dumps(options),
            )
        except helm_python.HelmError as e:
            raise HelmError(str(e)) from e
    return json.loads(payload)


def template(
    values: dict[str, Any] | None = None,
    *,
    release: str = "stepgate",
    namespace: str = "auth",
    api_versions: list[str] | None = None,
) -> Rendered:
    values = values or {}
    release_summary = _install_dry_run(values, release, namespace, api_versions or [])
    # The install action keeps hooks out of the release manifest; render the templates once more
    # for them (hooks depend on no capability).
    with helm_python.Chart.load(CHART) as chart:
        try:
            sources = chart.render(values, name=release, namespace=namespace)
        except helm_python.HelmError as e:
            raise HelmError(str(e)) from e
    hooks = [
        doc
        for name, text in sorted(sources.items())
        if name.endswith(".yaml")
        for doc in load_documents(text)
        if "helm.sh/hook" in doc.get("metadata", {}).get("annotations", {})
    ]
    return Rendered(
        manifests=load_documents(release_summary["manifest"]),
        hooks=hooks,
        notes=release_summary["notes"],
        release=release,
        namespace=namespace,
        sources=sources,
    )


def sdk_versions() -> tuple[str, str]:
    """(helm-python-sdk's libhelm_c, the Helm Go SDK inside it)."""
    return helm_python.helm_c_version(), helm_python.helm_sdk_version()
