"""The Helm chart helm/stepgate, rendered by Helm 4 itself (helm-python-sdk), for each values file
under helm/tests/values/:

- `helm lint --strict` passes and the chart renders as `helm template` renders it;
- every rendered object validates with kubernetes-validate (strict: an unknown field fails),
  except the CRDs it has no schema for (cert-manager's Certificate, the Prometheus Operator's
  ServiceMonitor), whose fields are checked here against the CRDs' field lists;
- the policy in the rendered ConfigMap passes the real `stepgate check`;
- the pods meet the restricted Pod Security Standard, the probes, ports, mounts and grace period
  agree with stepgate's flags, and NOTES.txt's Istio provider and Envoy cluster point at the
  release's Service (the Envoy cluster is validated by the real Envoy);
- stepgate started with the chart's arguments, on the Secrets' files as the chart mounts them
  (certificates made here with openssl), answers the chart's own clients: the exec probes'
  `stepgate health` over TLS and mutual TLS, and the `helm test` pod's, each run as rendered;
- a misspelt value is refused by the values schema, naming the key, and inconsistent values by
  the templates, saying what to change.

Run: .venv/bin/python -m pytest -q helm/tests (requirements: helm/tests/requirements.txt; the
stepgate binary from STEPGATE_BIN, default target/debug/stepgate; Envoy from STEPGATE_ENVOY,
default .venv/bin/envoy).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import re
import shlex
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import chart_render
from chart_render import CHART, REPO, HelmError, Rendered
from conftest import EXTENDED_KEY_USAGES, Pki

VALUES_DIR = Path(__file__).resolve().parent / "values"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
GRPC_PORT = 50051
METRICS_PORT = 9464


@dataclass(frozen=True)
class Case:
    values_file: str
    kinds: frozenset[str]
    api_versions: tuple[str, ...] = ()
    # The `helm test` pod, and the policy check's Job and ConfigMap.
    hooks: frozenset[str] = frozenset({"Pod", "Job", "ConfigMap"})
    tls: bool = False
    mutual_tls: bool = False
    # With tls.probeClient: the SAN its certificate names (one of tls.clientSANs).
    probe_client_san: str | None = None


BASE = frozenset({"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget"})
CASES = {
    "default": Case("default.yaml", BASE),
    "ha": Case("ha.yaml", BASE | {"HorizontalPodAutoscaler", "PodDisruptionBudget"}),
    "tls-secret": Case(
        "tls-secret.yaml", BASE, tls=True, mutual_tls=True,
        probe_client_san="spiffe://cluster.local/ns/auth/sa/stepgate-probe",
    ),
    "tls-cert-manager": Case("tls-cert-manager.yaml", BASE | {"Certificate"}, tls=True),
    "tls-cert-manager-mtls": Case("tls-cert-manager-mtls.yaml", BASE | {"Certificate"}, tls=True, mutual_tls=True),
    "service-monitor": Case("service-monitor.yaml", BASE | {"ServiceMonitor"}, api_versions=(SERVICE_MONITOR_API,)),
    # No policy check: the ConfigMap may not exist before an install.
    "existing-configmap": Case("existing-configmap.yaml", BASE - {"ConfigMap"}, hooks=frozenset({"Pod"})),
    "network-policy": Case("network-policy.yaml", BASE | {"NetworkPolicy"}),
    "tracing-and-extras": Case("tracing-and-extras.yaml", BASE),
    "risk-store": Case("risk-store.yaml", BASE),
    "admin": Case("admin.yaml", BASE),
    "admin-tls-network-policy": Case(
        "admin-tls-network-policy.yaml", BASE | {"Certificate", "NetworkPolicy"}, tls=True, mutual_tls=True,
    ),
}
# The cases with admin.enabled (test_admin_cases_are_the_values_files_that_enable_it).
ADMIN_CASES = ["admin", "admin-tls-network-policy"]
WITH_RENDERED_POLICY = [name for name in CASES if name != "existing-configmap"]
TLS_CASES = [name for name, case in CASES.items() if case.tls]
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")

# The fields of Istio's EnvoyExternalAuthorizationGrpcProvider (istio/api mesh/v1alpha1/config.proto).
GRPC_PROVIDER_FIELDS = {"service", "port", "timeout", "failOpen", "statusOnError", "includeRequestBodyInCheck"}

# What kubernetes-validate has no schema for, and the fields their CRDs define (cert-manager v1
# Certificate spec; Prometheus Operator v1 ServiceMonitor spec and Endpoint).
CRD_KINDS = {("cert-manager.io/v1", "Certificate"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
CERTIFICATE_SPEC_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
    "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject",
    "nameConstraints", "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "secretName", "secretTemplate", "signatureAlgorithm", "subject", "uris",
    "usages",
}
CERTIFICATE_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}
SERVICE_MONITOR_SPEC_FIELDS = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints",
    "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "namespaceSelector", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "podTargetLabels", "sampleLimit", "scrapeClass",
    "scrapeClassicHistograms", "scrapeProtocols", "selector", "selectorMechanism",
    "serviceDiscoveryRole", "targetLabels", "targetLimit",
}
SERVICE_MONITOR_ENDPOINT_FIELDS = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}
# The Prometheus Operator's Duration pattern.
PROMETHEUS_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")


# ---------------------------------------------------------------------------------------------
# Rendering


def case_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES_DIR / CASES[name].values_file).read_text(encoding="utf-8")) or {}


@functools.cache
def rendered(name: str) -> Rendered:
    case = CASES[name]
    return chart_render.template(case_values(name), api_versions=list(case.api_versions))


def fullname(r: Rendered) -> str:
    return r.one("Deployment")["metadata"]["name"]


def pod_spec(r: Rendered) -> dict:
    return r.one("Deployment")["spec"]["template"]["spec"]


def hook_of(r: Rendered, kind: str) -> dict:
    found = [d for d in r.hooks if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} hook, rendered {len(found)}"
    return found[0]


def helm_test_pod(r: Rendered) -> dict:
    """The `helm test` pod."""
    pod = hook_of(r, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return pod


def check_job(r: Rendered) -> dict:
    """The policy check run before an install or upgrade."""
    return hook_of(r, "Job")


def container(r: Rendered) -> dict:
    containers = pod_spec(r)["containers"]
    assert [c["name"] for c in containers] == ["stepgate"]
    return containers[0]


def arg_value(args: list[str], flag: str) -> str:
    values = arg_values(args, flag)
    assert len(values) == 1, f"{flag} appears {len(values)} times in {args}"
    return values[0]


def arg_values(args: list[str], flag: str) -> list[str]:
    found = []
    for i, arg in enumerate(args):
        if arg == flag:
            assert i + 1 < len(args), f"{flag} has no value"
            found.append(args[i + 1])
        elif arg.startswith(flag + "="):
            found.append(arg.split("=", 1)[1])
    return found


def port_of(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d+)", address)
    assert m, f"not host:port: {address!r}"
    return m.group(1), int(m.group(2))


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, f"not a duration: {duration!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def main_service(r: Rendered) -> dict:
    """The Service the mesh, the gateways and Envoy call: the one with the `grpc` port."""
    found = [s for s in r.of_kind("Service") if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert len(found) == 1, f"expected one Service with a `grpc` port, rendered {len(found)}"
    return found[0]


def service_port(r: Rendered, name: str) -> dict:
    ports = [p for p in main_service(r)["spec"]["ports"] if p["name"] == name]
    assert len(ports) == 1, f"the Service needs one port named {name!r}"
    return ports[0]


def container_port(c: dict, name: str) -> int:
    ports = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    assert len(ports) == 1, f"the container needs one port named {name!r}"
    return ports[0]


def mount_for(r: Rendered, path: str) -> tuple[dict, dict]:
    """The volume mount holding `path` in the stepgate container, and its volume."""
    return mount_in(pod_spec(r), container(r), path)


def mount_in(spec: dict, c: dict, path: str) -> tuple[dict, dict]:
    """The volume mount holding `path` in container `c` of pod `spec`, and its volume."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        if Path(path).parent == Path(mount["mountPath"]):
            return mount, volumes[mount["name"]]
    raise AssertionError(f"no volume is mounted at {Path(path).parent} in container {c['name']}")


def secret_item(spec: dict, c: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in container `c` of pod `spec`."""
    _, volume = mount_in(spec, c, path)
    assert "secret" in volume, f"{path} is not from a Secret"
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    name = Path(path).name
    return volume["secret"]["secretName"], items.get(name, name)


def rendered_policy(r: Rendered) -> str:
    config = arg_value(container(r)["args"], "--config")
    mount, volume = mount_for(r, config)
    name = volume["configMap"]["name"]
    maps = [d for d in r.of_kind("ConfigMap") if d["metadata"]["name"] == name]
    assert len(maps) == 1, f"ConfigMap {name!r} is not rendered"
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    key = items.get(Path(config).name, Path(config).name)
    return maps[0]["data"][key]


def notes_snippet(notes: str, first_line: str) -> Any:
    """The YAML block of NOTES.txt that starts with `first_line`, indented by four spaces."""
    lines = notes.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "    " + first_line]
    assert len(starts) == 1, f"NOTES.txt has {len(starts)} blocks starting {first_line!r}:\n{notes}"
    block = []
    for line in lines[starts[0]:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    return yaml.safe_load("\n".join(block))


# ---------------------------------------------------------------------------------------------
# The chart and its schema


def test_chart_app_version_is_the_crate_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == cargo["package"]["version"], (
        "Chart.yaml appVersion must be the stepgate version in Cargo.toml (the image tag it deploys)"
    )


def test_every_values_file_is_a_case():
    files = {p.name for p in VALUES_DIR.glob("*.yaml")}
    assert files == {c.values_file for c in CASES.values()}


def test_helm_is_embedded():
    # No helm binary is used: the library reports the Helm SDK compiled into it.
    _, sdk = chart_render.sdk_versions()
    assert re.fullmatch(r"v4\.\d+\.\d+", sdk), sdk


def _open_objects(schema: dict, node: Any, path: str, found: list[str]) -> None:
    if isinstance(node, dict):
        if "$ref" in node:
            return  # definitions are walked on their own
        is_object = node.get("type") == "object" or "properties" in node
        # The policy's sections are stepgate's own document: `stepgate check` and stepgate's
        # start-up refuse unknown fields there (every struct of src/config/schema.rs denies them).
        inside_policy = path.startswith("/properties/policy/properties/")
        if is_object and not inside_policy:
            extra = node.get("additionalProperties")
            if extra is not False and not isinstance(extra, dict):
                found.append(path or "/")
        for key, child in node.items():
            if key in ("properties", "definitions"):
                for name, sub in child.items():
                    _open_objects(schema, sub, f"{path}/{key}/{name}", found)
            elif key in ("items", "additionalProperties"):
                _open_objects(schema, child, f"{path}/{key}", found)


def test_values_schema_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    open_objects: list[str] = []
    _open_objects(schema, schema, "", open_objects)
    assert not open_objects, f"objects that accept unknown keys: {open_objects}"


def policy_file_fields() -> set[str]:
    """The top-level keys of the policy file: the fields of `PolicyFile` in src/config/schema.rs."""
    source = (REPO / "src" / "config" / "schema.rs").read_text(encoding="utf-8")
    body = re.search(r"pub struct PolicyFile \{(.*?)\n\}", source, re.S)
    assert body, "src/config/schema.rs has no `pub struct PolicyFile`"
    fields, rename = set(), None
    for line in body.group(1).splitlines():
        if m := re.search(r'#\[serde\(.*\brename\s*=\s*"([^"]+)"', line):
            rename = m.group(1)
        elif m := re.match(r"\s*pub\s+(?:r#)?(\w+)\s*:", line):
            fields.add(rename or m.group(1))
            rename = None
    return fields


def test_policy_sections_in_the_schema_are_the_policy_file_fields():
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert set(schema["properties"]["policy"]["properties"]) == policy_file_fields(), (
        "values.schema.json's `policy` sections must be exactly the policy file's top-level keys"
    )


# ---------------------------------------------------------------------------------------------
# Each values file: lint, render, validate


@pytest.mark.parametrize("name", CASES)
def test_lint_passes(name):
    assert chart_render.lint(case_values(name)) == []


@pytest.mark.parametrize("name", CASES)
def test_renders_the_expected_objects(name):
    r = rendered(name)
    assert {d["kind"] for d in r.manifests} == CASES[name].kinds
    assert {d["kind"] for d in r.hooks} == CASES[name].hooks
    dashboard_namespace = case_values(name).get("dashboard", {}).get("namespace") or r.namespace
    for doc in r.all():
        meta = doc["metadata"]
        expected = dashboard_namespace if meta["name"].endswith("-dashboard") else r.namespace
        assert meta["namespace"] == expected, meta["name"]
        assert meta["labels"]["app.kubernetes.io/instance"] == r.release


def kubernetes_versions() -> list[str]:
    floor = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))["kubeVersion"]
    m = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", floor)
    assert m, f"kubeVersion {floor!r} is not of the form >=X.Y.Z-0"
    return [m.group(1), "1.34.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("version", kubernetes_versions())
@pytest.mark.parametrize("name", CASES)
def test_objects_validate_with_kubernetes_validate(name, version):
    errors = []
    for doc in rendered(name).all():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # test_custom_resources_use_only_crd_fields
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc['apiVersion']} {doc['kind']}: no such API in Kubernetes {version}")
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
    assert not errors, f"invalid against Kubernetes {version}:\n" + "\n".join(errors)


@pytest.mark.parametrize("name", ["tls-cert-manager", "tls-cert-manager-mtls", "service-monitor"])
def test_custom_resources_use_only_crd_fields(name):
    r = rendered(name)
    custom = [d for d in r.manifests if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert custom, "the case renders no custom resource"
    for doc in custom:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
        spec = doc["spec"]
        if doc["kind"] == "Certificate":
            assert set(spec) <= CERTIFICATE_SPEC_FIELDS, set(spec) - CERTIFICATE_SPEC_FIELDS
            assert spec["secretName"] and spec["issuerRef"]["name"]
            assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
            assert set(spec["usages"]) <= CERTIFICATE_USAGES
            assert set(spec["privateKey"]) <= {"algorithm", "encoding", "rotationPolicy", "size"}
            assert spec["privateKey"]["algorithm"] in {"RSA", "ECDSA", "Ed25519"}
            assert spec["privateKey"]["rotationPolicy"] in {"Never", "Always"}
            assert GO_DURATION.match(spec["duration"]) and GO_DURATION.match(spec["renewBefore"])
            assert all(isinstance(n, str) and n for n in spec["dnsNames"])
        else:
            assert set(spec) <= SERVICE_MONITOR_SPEC_FIELDS, set(spec) - SERVICE_MONITOR_SPEC_FIELDS
            for endpoint in spec["endpoints"]:
                assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT_FIELDS
                assert PROMETHEUS_DURATION.match(endpoint["interval"])
                assert PROMETHEUS_DURATION.match(endpoint["scrapeTimeout"])
                assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])


@pytest.mark.parametrize("name", WITH_RENDERED_POLICY)
def test_rendered_policy_passes_stepgate_check(name, stepgate_bin, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(rendered_policy(rendered(name)), encoding="utf-8")
    result = subprocess.run(
        [stepgate_bin, "check", "--config", str(policy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"stepgate check exited {result.returncode}:\n{result.stderr}{result.stdout}"
    assert result.stdout.startswith("policy OK"), result.stdout


def test_default_policy_sets_only_lists():
    # Helm merges a user's map into the default map key by key, but replaces lists: a default
    # section that is a map (auth_contexts, upstream, limits) would leak into every user's policy.
    default = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["policy"]
    assert all(isinstance(section, list) for section in default.values()), default


def test_rendered_policy_is_the_values_policy_and_nothing_more():
    r = rendered("network-policy")
    assert yaml.safe_load(rendered_policy(r)) == case_values("network-policy")["policy"]


# ---------------------------------------------------------------------------------------------
# Pods


def restricted_violations(spec: dict) -> list[str]:
    """Where a pod spec breaks the restricted Pod Security Standard (Kubernetes 1.25+)."""
    problems = []
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            problems.append(host)
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed:
            problems.append(f"volume {volume['name']}: {kinds - allowed}")
    pod = spec.get("securityContext", {})
    if pod.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        name = c["name"]
        if not (sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("name", CASES)
def test_pods_meet_the_restricted_pod_security_standard(name):
    r = rendered(name)
    specs = [("Deployment", pod_spec(r)), ("helm test pod", helm_test_pod(r)["spec"])]
    specs += [("policy check", job["spec"]["template"]["spec"]) for job in r.hooks if job["kind"] == "Job"]
    for what, spec in specs:
        assert restricted_violations(spec) == [], what
        assert spec["automountServiceAccountToken"] is False, what
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, what
    assert pod_spec(r)["securityContext"]["runAsUser"] == 65532


@pytest.mark.parametrize("name", CASES)
def test_service_account_has_no_api_token(name):
    r = rendered(name)
    account = r.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod_spec(r)["serviceAccountName"] == account["metadata"]["name"]


@pytest.mark.parametrize("name", CASES)
def test_listeners_match_the_service_and_container_ports(name):
    r = rendered(name)
    c = container(r)
    assert c["args"][0] == "serve"
    host, port = port_of(arg_value(c["args"], "--listen"))
    assert host in ("0.0.0.0", "::"), "stepgate listens on loopback unless told otherwise"
    grpc = service_port(r, "grpc")
    assert grpc["appProtocol"] == "grpc" and grpc["port"] == GRPC_PORT
    assert container_port(c, grpc["targetPort"]) == port
    _, metrics = port_of(arg_value(c["args"], "--metrics-listen"))
    http_metrics = service_port(r, "http-metrics")
    assert http_metrics["port"] == METRICS_PORT
    assert container_port(c, http_metrics["targetPort"]) == metrics


@pytest.mark.parametrize("name", CASES)
def test_selectors_pick_stepgate_pods_and_not_the_test_pod(name):
    r = rendered(name)
    deployment = r.one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"]]
    selectors += [s["spec"]["selector"] for s in r.of_kind("Service")]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in r.of_kind("PodDisruptionBudget")]
    selectors += [d["spec"]["podSelector"]["matchLabels"] for d in r.of_kind("NetworkPolicy")]
    for constraint in pod_spec(r).get("topologySpreadConstraints", []):
        selectors.append(constraint["labelSelector"]["matchLabels"])
    for selector in selectors:
        assert selector and selector.items() <= labels.items()
        for hook in r.hooks:
            assert not selector.items() <= hook["metadata"]["labels"].items(), "the Service would route to the test pod"


def tls_values(name: str) -> dict[str, Any]:
    return case_values(name).get("tls", {})


def tls_secret_name(r: Rendered) -> str:
    _, volume = mount_for(r, arg_value(container(r)["args"], "--tls-cert"))
    return volume["secret"]["secretName"]


def server_name(name: str) -> str:
    """The name the chart's clients must check on stepgate's certificate: tls.serverName, or the
    Service's FQDN."""
    r = rendered(name)
    service = main_service(r)["metadata"]["name"]
    return tls_values(name).get("serverName") or f"{service}.{r.namespace}.svc.cluster.local"


def certificate_names(name: str) -> list[str]:
    """The DNS names on stepgate's certificate: the Certificate's, or for a Secret of one's own
    the one name the chart asks it to carry."""
    certificates = rendered(name).of_kind("Certificate")
    return certificates[0]["spec"]["dnsNames"] if certificates else [server_name(name)]


def uses_serving_certificate_as_client(name: str) -> bool:
    return CASES[name].mutual_tls and not tls_values(name).get("probeClient", {}).get("secretName")


def check_health_tls_args(name: str, spec: dict, c: dict, args: list[str]) -> None:
    """`stepgate health`'s TLS flags in `args`, run in container `c` of pod `spec`, trust the CA
    stepgate's certificate chains to, check a name it carries and, with mutual TLS, present a
    client certificate stepgate accepts, each from the Secret the values name."""
    r = rendered(name)
    tls = tls_values(name)
    serving = tls_secret_name(r)
    server_ca = tls.get("serverCA", {})
    assert secret_item(spec, c, arg_value(args, "--ca")) == (
        server_ca.get("secretName") or serving, server_ca.get("key", "ca.crt")
    )
    assert arg_value(args, "--tls-server-name") == server_name(name)
    assert server_name(name) in certificate_names(name)
    if not CASES[name].mutual_tls:
        assert not arg_values(args, "--cert") and not arg_values(args, "--key"), "no client certificate without mutual TLS"
        return
    cert, key = arg_value(args, "--cert"), arg_value(args, "--key")
    client_secret = tls.get("probeClient", {}).get("secretName") or serving
    assert secret_item(spec, c, cert) == (client_secret, "tls.crt")
    assert secret_item(spec, c, key) == (client_secret, "tls.key")
    client_sans = tls.get("clientSANs", [])
    if uses_serving_certificate_as_client(name):
        # stepgate's own certificate is the client certificate: it must allow client
        # authentication and, under a SAN allow-list, be named on it.
        for certificate in r.of_kind("Certificate"):
            assert "client auth" in certificate["spec"]["usages"]
        assert not client_sans or set(client_sans) & set(certificate_names(name))
    elif client_sans:
        assert CASES[name].probe_client_san in client_sans


def health_flags(stepgate_bin: str) -> set[str]:
    """The flags `stepgate health --help` lists."""
    result = subprocess.run([stepgate_bin, "health", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z-]*)", result.stdout, re.M))


def flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


@pytest.mark.parametrize("name", CASES)
def test_probes_ask_grpc_health_natively_or_with_stepgate_health_over_tls(name, stepgate_bin):
    r = rendered(name)
    c = container(r)
    _, listen = port_of(arg_value(c["args"], "--listen"))
    known = health_flags(stepgate_bin)
    assert {"--server", "--timeout", "--ca", "--cert", "--key", "--tls-server-name"} <= known
    commands = []
    for probe in PROBES:
        # Start-up and liveness ask whether the process answers, not whether it is ready (keys
        # loaded, the shared blocks read, not draining): an identity provider or Redis down must
        # not restart every replica.
        service = "" if probe == "readinessProbe" else "liveness"
        if not CASES[name].tls:
            assert "exec" not in c[probe]
            assert c[probe]["grpc"] == {"port": listen, "service": service}, probe
            continue
        # The kubelet's gRPC probe speaks plaintext only: the image's own client over TLS, with
        # no shell (distroless).
        assert set(c[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"exec"}, probe
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["/stepgate", "health"], probe
        args = command[2:]
        assert flags(args) <= known, f"{probe}: flags stepgate health does not take: {flags(args) - known}"
        assert arg_value(args, "--server") == f"https://127.0.0.1:{listen}", probe
        # Connecting and the call may each take --timeout: both fit in the probe's timeout, so
        # the process ends by itself before the kubelet gives up on it.
        timeout = seconds(arg_value(args, "--timeout"))
        assert 0 < 2 * timeout < c[probe]["timeoutSeconds"], f"{probe}: --timeout {timeout}s"
        assert (arg_value(args, "--service") if "--service" in flags(args) else "") == service, probe
        check_health_tls_args(name, pod_spec(r), c, args)
        commands.append([a for a in without(without(args, "--timeout"), "--service")])
    assert all(command == commands[0] for command in commands), "the three probes ask the same server"
    for probe, value in zip(PROBES, ("startup", "readiness", "liveness")):
        timings = {k: c[probe][k] for k in ("periodSeconds", "timeoutSeconds", "failureThreshold")}
        expected = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["probes"][value]
        expected.update(case_values(name).get("probes", {}).get(value, {}))
        assert timings == expected, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, (
        "the start-up probe must wait minutes for a slow identity provider, not seconds"
    )
    liveness = c["livenessProbe"]
    drain = seconds(arg_value(c["args"], "--drain-delay"))
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


@pytest.mark.parametrize("name", CASES)
def test_grace_period_covers_the_drain_and_the_last_call(name):
    r = rendered(name)
    args = container(r)["args"]
    drain = seconds(arg_value(args, "--drain-delay"))
    request = seconds(arg_value(args, "--request-timeout"))
    assert pod_spec(r)["terminationGracePeriodSeconds"] > drain + request


@pytest.mark.parametrize("name", CASES)
def test_policy_and_certificates_are_mounted_as_directories(name):
    r = rendered(name)
    c = container(r)
    for mount in c["volumeMounts"]:
        assert "subPath" not in mount, "a subPath mount never sees ConfigMap or Secret updates"
        assert mount["readOnly"] is True
    _, volume = mount_for(r, arg_value(c["args"], "--config"))
    assert "configMap" in volume
    assert arg_value(c["args"], "--watch-config") == "true"


@pytest.mark.parametrize("name", CASES)
def test_resources_and_spread_are_set(name):
    r = rendered(name)
    resources = container(r)["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    keys = {t["topologyKey"] for t in pod_spec(r)["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    expected = case_values(name).get("topologySpread", {}).get("whenUnsatisfiable", "ScheduleAnyway")
    assert {t["whenUnsatisfiable"] for t in pod_spec(r)["topologySpreadConstraints"]} == {expected}


def run_with_chart_args(stepgate_bin: str, args: list[str], env: dict[str, str], files: dict[str, Path]) -> str:
    """Starts stepgate with the chart's arguments, file and address flags pointed at local ones;
    returns its log up to the line saying it listens."""
    local = {"--listen": "127.0.0.1:0", "--metrics-listen": "127.0.0.1:0", "--admin-listen": "127.0.0.1:0"}
    local.update({flag: str(path) for flag, path in files.items()})
    command = list(args)
    for i, arg in enumerate(command[:-1]):
        if arg in local:
            command[i + 1] = local[arg]
    proc = subprocess.Popen(
        [stepgate_bin, *command], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []
    timer = threading.Timer(20, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            log.append(line)
            if "stepgate listening on" in line:
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    return "".join(log)


def demo_policy() -> str:
    """The demo policy, its key set by absolute path: its keys are files, so every issuer has keys
    at once (the chart's policy would fetch them)."""
    demo = (REPO / "examples" / "stepgate.yaml").read_text(encoding="utf-8")
    return demo.replace("demo-keys/jwks.json", str(REPO / "examples" / "demo-keys" / "jwks.json"))


def container_env(c: dict) -> dict[str, str]:
    """The container's literal environment, with nothing sent off the machine."""
    env = {"PATH": os.environ.get("PATH", "")}
    for variable in c.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"  # discard: nothing leaves the machine
    return env


def test_stepgate_takes_the_transport_bounds_extra_args_give_again(stepgate_bin, make_certificate, tmp_path):
    # tracing-and-extras renders --max-connections 2000 from its values, then 20000 in extraArgs.
    c = container(rendered("tracing-and-extras"))
    log = start_log(stepgate_bin, c["args"], c, make_certificate, tmp_path)
    listening = [line for line in log.splitlines() if "stepgate listening on" in line]
    assert listening, f"stepgate did not start:\n{log}"
    assert "max_connections=20000 " in listening[0], listening[0]
    assert "max_connections_per_source=32 " in listening[0], listening[0]


@pytest.mark.parametrize("name", CASES)
def test_stepgate_starts_with_the_charts_arguments(name, stepgate_bin, make_certificate, tmp_path):
    # Every flag and value the chart passes must be one the binary takes: a misspelt flag only
    # shows in the cluster, as a pod that exits at once. Paths and addresses become local ones;
    # the policy is the demo policy, whose keys are files (the chart's would be fetched).
    policy = tmp_path / "policy.yaml"
    policy.write_text(demo_policy(), encoding="utf-8")
    cert, key = make_certificate(tmp_path, "tls", "localhost")
    c = container(rendered(name))
    log = run_with_chart_args(
        stepgate_bin, c["args"], container_env(c),
        {"--config": policy, "--tls-cert": cert, "--tls-key": key, "--client-ca": cert},
    )
    assert "stepgate listening on" in log, f"stepgate did not start with {c['args']}:\n{log}"


# ---------------------------------------------------------------------------------------------
# The chart's own clients against a real stepgate: the probes and `helm test`, as rendered


def san_entry(san: str) -> str:
    return f"URI:{san}" if "://" in san else f"DNS:{san}"


def case_secrets(name: str, pki: Pki, usages: list[str] | None = None) -> dict[str, dict[str, bytes]]:
    """The Secrets a case's values name, filled as cert-manager or an operator would: stepgate's
    certificate (naming certificate_names, with the Certificate's usages, or for a Secret of one's
    own the ones the documentation asks for) from a CA of its own; the client CA (the same one
    when tls.clientCA names no Secret) and the probe client certificate from it."""
    r = rendered(name)
    tls = tls_values(name)
    certificates = r.of_kind("Certificate")
    if usages is None:
        if certificates:
            usages = certificates[0]["spec"]["usages"]
        else:
            usages = ["server auth"] + (["client auth"] if uses_serving_certificate_as_client(name) else [])
    server_ca = pki.ca("server-ca")
    serving = pki.issue(
        server_ca, "serving", [san_entry(n) for n in certificate_names(name)],
        [EXTENDED_KEY_USAGES[u] for u in usages if u in EXTENDED_KEY_USAGES],
    )
    serving_secret = {"tls.crt": serving[0].read_bytes(), "tls.key": serving[1].read_bytes()}
    if certificates:
        serving_secret["ca.crt"] = server_ca[0].read_bytes()  # as cert-manager's CA issuer writes it
    secrets = {tls_secret_name(r): serving_secret}

    def put(secret: str, key: str, content: bytes) -> None:
        secrets.setdefault(secret or tls_secret_name(r), {})[key] = content

    server_ca_values = tls.get("serverCA", {})
    put(server_ca_values.get("secretName"), server_ca_values.get("key", "ca.crt"), server_ca[0].read_bytes())
    if CASES[name].mutual_tls:
        client_ca_values = tls["clientCA"]
        client_ca = pki.ca("client-ca") if client_ca_values.get("secretName") else server_ca
        put(client_ca_values.get("secretName"), client_ca_values.get("key", "ca.crt"), client_ca[0].read_bytes())
        probe_secret = tls.get("probeClient", {}).get("secretName")
        if probe_secret:
            probe = pki.issue(client_ca, "probe-client", [san_entry(CASES[name].probe_client_san)], ["clientAuth"])
            secrets[probe_secret] = {"tls.crt": probe[0].read_bytes(), "tls.key": probe[1].read_bytes()}
    return secrets


def materialize(spec: dict, c: dict, root: Path, secrets: dict[str, dict[str, bytes]], policy: str | None = None) -> list[str]:
    """Writes the files container `c` of pod `spec` mounts under `root`, as the kubelet projects
    its volumes (only the listed items; a ConfigMap's items hold `policy`, by default the demo
    policy); returns the mount paths."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    paths = []
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        directory = root / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            secret = volume["secret"]["secretName"]
            assert secret in secrets, f"{c['name']} mounts Secret {secret!r}, which the values do not name"
            for item in volume["secret"]["items"]:
                assert item["key"] in secrets[secret], f"Secret {secret!r} has no key {item['key']!r}"
                (directory / item["path"]).write_bytes(secrets[secret][item["key"]])
        else:
            for item in volume["configMap"]["items"]:
                (directory / item["path"]).write_text(policy or demo_policy(), encoding="utf-8")
        paths.append(mount["mountPath"])
    return paths


def localize(args: list[str], root: Path, mount_paths: list[str]) -> list[str]:
    """`args` with every path under a mount moved under `root`."""
    return [
        str(root) + arg if any(arg.startswith(m.rstrip("/") + "/") for m in mount_paths) else arg
        for arg in args
    ]


def with_value(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return args[: i + 1] + [value] + args[i + 2:]


def without(args: list[str], flag: str, value: str | None = None) -> list[str]:
    """`args` without `flag` and its value (only where the value is `value`, when given)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == flag and (value is None or args[i + 1] == value):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


@dataclass
class Started:
    """A stepgate started as the chart's container runs it: its gRPC address (host:port), its
    admin listener's URL (scheme://host:port, as it logs it) when it has one, and its log so far."""

    address: str
    admin_url: str | None
    log: list[str]


@contextlib.contextmanager
def started_stepgate(stepgate_bin: str, r: Rendered, root: Path, secrets: dict, edit=lambda args: args, policy: str | None = None):
    """stepgate started with rendering `r`'s container arguments, on its mounted files under
    `root` (the policy ConfigMap holding `policy`, by default the demo policy), listening on
    ephemeral loopback ports."""
    c = container(r)
    mounts = materialize(pod_spec(r), c, root, secrets, policy)
    args = edit(localize(c["args"], root, mounts))
    for flag in ("--listen", "--metrics-listen", "--admin-listen"):
        if flag in args:
            args = with_value(args, flag, "127.0.0.1:0")
    proc = subprocess.Popen(
        [stepgate_bin, *args], cwd=REPO, env=container_env(c), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []
    admin: list[str] = []
    found: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for line in proc.stderr:
            log.append(line)
            if m := re.search(r"admin listener on (https?://[0-9.]+:[0-9]+)", line):
                admin.append(m.group(1))
            if m := re.search(r"stepgate listening on ([0-9.]+:[0-9]+)", line):
                found.put(m.group(1))
        found.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        try:
            address = found.get(timeout=20)
        except queue.Empty:
            address = None
        assert address, f"stepgate did not start with {args}:\n{''.join(log)}"
        # stepgate logs its admin listener before it says it is listening.
        assert len(admin) <= 1, admin
        yield Started(address, admin[0] if admin else None, log)
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def chart_stepgate(stepgate_bin: str, name: str, root: Path, secrets: dict, edit=lambda args: args):
    """stepgate started as the chart's container runs it for case `name`, on its mounted files
    under `root`, listening on an ephemeral loopback port: yields its gRPC address."""
    with started_stepgate(stepgate_bin, rendered(name), root, secrets, edit) as started:
        yield started.address


def probe_command(stepgate_bin: str, name: str, probe: str, root: Path, address: str) -> tuple[list[str], float]:
    """The exec probe's command as the kubelet runs it in the container (the image's /stepgate is
    the binary under test, the mounts are under `root`, 127.0.0.1:<port> the server's address),
    and the probe's timeout."""
    r = rendered(name)
    c = container(r)
    command = c[probe]["exec"]["command"]
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    args = localize(command[1:], root, mounts)
    args = with_value(args, "--server", arg_value(args, "--server").rsplit(":", 1)[0] + ":" + address.rsplit(":", 1)[1])
    return [stepgate_bin, *args], c[probe]["timeoutSeconds"]


def run_probe(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs a probe's command within its timeout, as the kubelet would (too slow is a failure)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        pytest.fail(f"the probe took longer than its {timeout} s: {command}")


def passes(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and result.stdout.strip() == "SERVING"


@pytest.mark.parametrize("name", TLS_CASES)
def test_tls_probes_pass_against_stepgate_started_with_the_charts_arguments(name, stepgate_bin, pki, tmp_path):
    secrets = case_secrets(name, pki)
    root = tmp_path / "pod"
    with chart_stepgate(stepgate_bin, name, root, secrets) as address:
        # The start-up probe is retried until it passes, as the kubelet does; then readiness and
        # liveness must pass at once.
        command, timeout = probe_command(stepgate_bin, name, "startupProbe", root, address)
        deadline = time.monotonic() + 10
        while not passes(result := run_probe(command, timeout)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert passes(result), f"startupProbe: {command}\n{result.stdout}{result.stderr}"
        for probe in ("readinessProbe", "livenessProbe"):
            command, timeout = probe_command(stepgate_bin, name, probe, root, address)
            result = run_probe(command, timeout)
            assert passes(result), f"{probe}: {command}\n{result.stdout}{result.stderr}"

        # Each TLS flag is needed: the success above is not a client that checks nothing.
        refused = [without(command, "--tls-server-name")]  # 127.0.0.1 is not on the certificate
        if CASES[name].mutual_tls:
            refused.append(without(without(command, "--cert"), "--key"))  # mutual TLS
        for args in refused:
            assert run_probe(args, timeout).returncode == 1, f"passed without a TLS flag it needs: {args}"


@pytest.mark.parametrize("name", CASES)
def test_helm_test_pod_passes_against_stepgate_started_with_the_charts_arguments(name, stepgate_bin, pki, tmp_path):
    r = rendered(name)
    secrets = case_secrets(name, pki) if CASES[name].tls else {}
    with chart_stepgate(stepgate_bin, name, tmp_path / "pod", secrets) as address:
        pod = helm_test_pod(r)
        [c] = pod["spec"]["containers"]
        root = tmp_path / "test-pod"
        args = localize(c["args"], root, materialize(pod["spec"], c, root, secrets))
        # The Service's name resolves to the pod; the certificate is checked for --tls-server-name.
        scheme = arg_value(args, "--server").split("://")[0]
        args = with_value(args, "--server", f"{scheme}://{address}")
        result = run_probe([stepgate_bin, *args], 30)
        assert passes(result), f"helm test: stepgate {' '.join(args)}\n{result.stdout}{result.stderr}"


def test_probes_presenting_stepgates_certificate_need_the_client_auth_usage(stepgate_bin, pki, tmp_path):
    # Why the chart's Certificate lists `client auth` with mutual TLS: without it stepgate refuses
    # its own certificate as a client certificate, and the pods would never become ready.
    name = "tls-cert-manager-mtls"
    usages = rendered(name).one("Certificate")["spec"]["usages"]
    assert "client auth" in usages
    secrets = case_secrets(name, pki, usages=[u for u in usages if u != "client auth"])
    root = tmp_path / "pod"
    with chart_stepgate(stepgate_bin, name, root, secrets) as address:
        command, timeout = probe_command(stepgate_bin, name, "readinessProbe", root, address)
        assert run_probe(command, timeout).returncode == 1


def test_a_client_san_list_without_the_probes_identity_would_lock_them_out(stepgate_bin, pki, tmp_path):
    # Why the chart refuses tls.clientSANs that name none of stepgate's own names when the probes
    # present its certificate: stepgate would refuse them.
    name = "tls-cert-manager-mtls"
    values = case_values(name)
    listed = set(values["tls"]["clientSANs"]) & set(certificate_names(name))
    assert listed
    root = tmp_path / "pod"
    edit = lambda args: functools.reduce(lambda a, san: without(a, "--client-san", san), listed, args)
    with chart_stepgate(stepgate_bin, name, root, case_secrets(name, pki), edit=edit) as address:
        command, timeout = probe_command(stepgate_bin, name, "readinessProbe", root, address)
        assert run_probe(command, timeout).returncode == 1
    values["tls"]["clientSANs"] = [san for san in values["tls"]["clientSANs"] if san not in listed]
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "tls.clientSANs must list stepgate.auth.svc.cluster.local" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# What each values file turns on


def test_ha_scales_on_cpu_and_keeps_drains_possible():
    r = rendered("ha")
    deployment = r.one("Deployment")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": fullname(r)}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["averageUtilization"] == 60
    pdb = r.one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_a_disruption_budget_that_leaves_a_pod_to_evict_renders_as_given():
    # 50 % of 2 pods is 1 (Kubernetes rounds up); 25 % unavailable of 2 is also 1.
    for budget, field in [({"minAvailable": "50%"}, "minAvailable"), ({"maxUnavailable": "25%"}, "maxUnavailable")]:
        pdb = chart_render.template({"podDisruptionBudget": budget}).one("PodDisruptionBudget")
        assert pdb["spec"][field] == budget[field]
        kubernetes_validate.validate(pdb, kubernetes_validate.latest_version(), strict=True)


def test_default_is_two_replicas_kept_through_drains_without_autoscaler():
    r = rendered("default")
    assert r.one("Deployment")["spec"]["replicas"] == 2
    assert r.one("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert not r.of_kind("HorizontalPodAutoscaler")
    # A node drain may not evict both replicas at once: the proxies fail closed.
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


def test_tls_from_a_secret_with_mutual_tls():
    r = rendered("tls-secret")
    c = container(r)
    args = c["args"]
    cert, key, ca = (arg_value(args, f) for f in ("--tls-cert", "--tls-key", "--client-ca"))
    _, tls_volume = mount_for(r, cert)
    assert tls_volume["secret"]["secretName"] == "stepgate-serving"
    assert {i["key"] for i in tls_volume["secret"]["items"]} == {"tls.crt", "tls.key"}
    assert mount_for(r, key)[1] == tls_volume
    assert (Path(cert).name, Path(key).name) == ("tls.crt", "tls.key")
    _, ca_volume = mount_for(r, ca)
    assert ca_volume["secret"]["secretName"] == "envoy-client-ca" and Path(ca).name == "ca.crt"
    assert arg_values(args, "--client-san") == [
        "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
        "spiffe://cluster.local/ns/auth/sa/stepgate-probe",
    ]
    # The probes trust the CA bundle of another Secret, and present their own client certificate.
    assert secret_item(pod_spec(r), c, arg_value(c["readinessProbe"]["exec"]["command"], "--ca")) == (
        "internal-ca-bundle", "bundle.pem"
    )
    assert secret_item(pod_spec(r), c, arg_value(c["readinessProbe"]["exec"]["command"], "--cert")) == (
        "stepgate-probe-client", "tls.crt"
    )
    pod = helm_test_pod(r)
    assert "not available" not in r.notes and "helm test stepgate -n auth" in r.notes


def test_tls_from_cert_manager():
    r = rendered("tls-cert-manager")
    certificate = r.one("Certificate")
    spec = certificate["spec"]
    _, volume = mount_for(r, arg_value(container(r)["args"], "--tls-cert"))
    assert spec["secretName"] == volume["secret"]["secretName"] == f"{fullname(r)}-tls"
    assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    service = main_service(r)["metadata"]["name"]
    assert f"{service}.{r.namespace}.svc.cluster.local" in spec["dnsNames"]
    assert {service, f"{service}.{r.namespace}", f"{service}.{r.namespace}.svc", "stepgate.example.internal"} <= set(spec["dnsNames"])
    assert "server auth" in spec["usages"]
    # Without mutual TLS nobody presents stepgate's certificate as a client certificate.
    assert "client auth" not in spec["usages"]
    assert "--client-ca" not in container(r)["args"]
    # tls.serverName: one of the Certificate's extra names rather than the FQDN.
    assert arg_value(container(r)["readinessProbe"]["exec"]["command"], "--tls-server-name") == "stepgate.example.internal"


def test_mutual_tls_from_cert_manager_reuses_stepgates_certificate_for_the_probes():
    r = rendered("tls-cert-manager-mtls")
    spec = r.one("Certificate")["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    c = container(r)
    secret = spec["secretName"]
    assert secret_item(pod_spec(r), c, arg_value(c["args"], "--client-ca")) == (secret, "ca.crt")
    command = c["readinessProbe"]["exec"]["command"]
    assert secret_item(pod_spec(r), c, arg_value(command, "--ca")) == (secret, "ca.crt")
    assert arg_value(command, "--cert") == arg_value(c["args"], "--tls-cert")
    assert arg_value(command, "--key") == arg_value(c["args"], "--tls-key")
    fqdn = f"{fullname(r)}.{r.namespace}.svc.cluster.local"
    assert arg_value(command, "--tls-server-name") == fqdn and fqdn in arg_values(c["args"], "--client-san")
    # The test pod presents the same certificate, so it mounts stepgate's key; nothing else does.
    pod = helm_test_pod(r)
    [test] = pod["spec"]["containers"]
    assert secret_item(pod["spec"], test, arg_value(test["args"], "--key")) == (secret, "tls.key")


def test_service_monitor_only_where_the_cluster_serves_its_api():
    r = rendered("service-monitor")
    monitor = r.one("ServiceMonitor")
    service = main_service(r)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [r.namespace]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http-metrics"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    without_api = chart_render.template(case_values("service-monitor"))
    assert not without_api.of_kind("ServiceMonitor")
    assert "serves no monitoring.coreos.com/v1" in without_api.notes


def test_dashboard_configmap_holds_the_chart_dashboard():
    r = rendered("service-monitor")
    [dashboard] = [d for d in r.of_kind("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Security"}
    on_disk = json.loads((CHART / "dashboards" / "stepgate.json").read_text(encoding="utf-8"))
    assert json.loads(dashboard["data"]["stepgate.json"]) == on_disk


def test_existing_policy_configmap_is_mounted_and_none_is_rendered():
    r = rendered("existing-configmap")
    assert not r.of_kind("ConfigMap")
    _, volume = mount_for(r, arg_value(container(r)["args"], "--config"))
    assert volume["configMap"]["name"] == "payments-stepgate-policy"
    assert volume["configMap"]["items"] == [{"key": "policy.yaml", "path": "policy.yaml"}]


def test_network_policy_lets_in_only_the_named_namespaces():
    r = rendered("network-policy")
    policy = r.one("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    namespaces = [
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in grpc_rule["from"]
        if "namespaceSelector" in p
    ]
    assert namespaces == ["istio-system", "payments"]
    pods = [p["podSelector"]["matchLabels"] for p in grpc_rule["from"] if "podSelector" in p]
    assert len(pods) == 1 and pods[0].items() <= helm_test_pod(r)["metadata"]["labels"].items()
    assert all(set(p) == {"namespaceSelector"} or set(p) == {"podSelector"} for p in grpc_rule["from"])
    assert metrics_rule == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": "http-metrics", "protocol": "TCP"}],
    }


def env_of(r: Rendered) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(r).get("env", [])}


def test_the_memory_limit_holds_what_the_connection_bounds_let_callers_hold():
    # docs/limits.md: about 0.25 MiB kept by a connection that once had 100 calls at once, about
    # 0.46 MiB by one whose client ignored the limit, 7 KiB more for each call left open; a full
    # token cache of 100 000 entries and the process itself, about 100 MiB.
    defaults = chart_defaults()
    limit = defaults["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    limit_mib = int(limit[:-2])
    transport = defaults["transport"]
    busy = transport["maxConnections"] * 0.25
    assert busy + 100 <= limit_mib, (busy, limit_mib)
    # One address, every call of its connections left open: a handful of pods must not reach it.
    worst_per_source = transport["maxConnectionsPerSource"] * (0.46 + transport["maxConcurrentStreams"] * 7 / 1024)
    assert (limit_mib - 100) / worst_per_source >= 10, worst_per_source


def test_transport_bounds_render_as_flags_that_extra_args_override():
    assert chart_defaults()["transport"] == {
        "maxConnections": 2000, "maxConnectionsPerSource": 32, "maxConcurrentStreams": 100,
    }
    args = container(rendered("default"))["args"]
    assert arg_value(args, "--max-connections") == "2000"
    assert arg_value(args, "--max-connections-per-source") == "32"
    assert arg_value(args, "--max-concurrent-streams") == "100"
    # An extra argument naming the same flag comes after the chart's, and stepgate takes the last
    # (test_stepgate_starts_with_the_charts_arguments starts it so).
    args = container(rendered("tracing-and-extras"))["args"]
    assert arg_values(args, "--max-connections") == ["2000", "20000"]
    # Large numbers are written out, not as Helm's 1e+06.
    values = case_values("default")
    values["transport"] = {"maxConnections": 1000000, "maxConnectionsPerSource": 0, "maxConcurrentStreams": 4096}
    args = container(chart_render.template(values))["args"]
    assert arg_value(args, "--max-connections") == "1000000"
    assert arg_value(args, "--max-connections-per-source") == "0"
    assert arg_value(args, "--max-concurrent-streams") == "4096"


def test_tracing_and_escape_hatches():
    r = rendered("tracing-and-extras")
    env = env_of(r)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    assert env["RUST_BACKTRACE"] == "1" and env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "STEPGATE_WORKERS" not in env
    args = container(r)["args"]
    assert args[-2:] == ["--max-connections", "20000"], "extraArgs come last, after the chart's flags"
    assert arg_value(args, "--reflection") == "false"
    assert arg_value(args, "--log-format") == "text"
    assert arg_value(args, "--log-allow-sample") == "0.01"
    assert arg_value(container(rendered("default"))["args"], "--log-allow-sample") == "0"
    assert arg_value(args, "--balance") == "calls"
    assert arg_value(container(rendered("default"))["args"], "--balance") == "connections"


def test_no_tracing_without_an_endpoint():
    env = env_of(rendered("default"))
    assert not [name for name in env if name.startswith("OTEL_")]
    assert env == {"STEPGATE_WORKERS": "2"}


# ---------------------------------------------------------------------------------------------
# Who may call Check


GATEWAY_SAN = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
# The cases that set checkCallers (test_check_caller_cases_are_the_values_files_that_set_it).
CHECK_CALLER_CASES = ["tls-cert-manager-mtls", "network-policy"]


def check_callers_of(name: str) -> tuple[list[str], list[str]]:
    """Case `name`'s checkCallers: (networks, clientSANs)."""
    callers = case_values(name).get("checkCallers", {})
    return callers.get("networks", []), callers.get("clientSANs", [])


def test_check_callers_default_to_any_caller():
    assert chart_defaults()["checkCallers"] == {"networks": [], "clientSANs": []}
    args = container(rendered("default"))["args"]
    assert not arg_values(args, "--check-from") and not arg_values(args, "--check-client-san")


def test_check_caller_cases_are_the_values_files_that_set_it():
    assert [name for name in CASES if any(check_callers_of(name))] == CHECK_CALLER_CASES
    assert check_callers_of("network-policy") == (["10.0.0.0/8", "fd00::/8"], [])
    assert check_callers_of("tls-cert-manager-mtls") == ([], [GATEWAY_SAN])


@pytest.mark.parametrize("name", CASES)
def test_check_callers_render_a_flag_and_a_value_per_entry(name):
    args = container(rendered(name))["args"]
    networks, sans = check_callers_of(name)
    assert arg_values(args, "--check-from") == networks
    assert arg_values(args, "--check-client-san") == sans
    for flag in ("--check-from", "--check-client-san"):
        assert not [a for a in args if a.startswith(flag + "=")], "a flag and its value, as two arguments"


def test_both_check_caller_lists_render_before_the_extra_args():
    values = case_values("tls-cert-manager-mtls")
    values["checkCallers"]["networks"] = ["10.244.0.0/16", "10.96.12.7", "fd00:10:244::/48"]
    values["extraArgs"] = ["--max-connections", "20000"]
    args = container(chart_render.template(values))["args"]
    assert arg_values(args, "--check-from") == ["10.244.0.0/16", "10.96.12.7", "fd00:10:244::/48"]
    assert arg_values(args, "--check-client-san") == [GATEWAY_SAN]
    assert args[-2:] == ["--max-connections", "20000"]


def logged_check_callers(log: str) -> dict[str, Any] | None:
    """The JSON log line in which stepgate says whom Check answers, if any."""
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("message") == "Check answers only the listed callers":
                return entry
    return None


def start_log(stepgate_bin: str, args: list[str], c: dict, make_certificate, tmp_path: Path) -> str:
    """stepgate's log when started with `args` as test_stepgate_starts_with_the_charts_arguments
    starts it: up to the line saying it listens, or up to its exit."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(demo_policy(), encoding="utf-8")
    cert, key = make_certificate(tmp_path, "tls", "localhost")
    return run_with_chart_args(
        stepgate_bin, args, container_env(c),
        {"--config": policy, "--tls-cert": cert, "--tls-key": key, "--client-ca": cert},
    )


@pytest.mark.parametrize("name", CHECK_CALLER_CASES)
def test_stepgate_answers_check_only_from_the_charts_callers(name, stepgate_bin, make_certificate, tmp_path):
    # The rendered flags reach stepgate as lists it takes: it starts, and says whom Check answers.
    # (The probes and `helm test` of these cases pass against it: they ask gRPC health only.)
    c = container(rendered(name))
    assert arg_value(c["args"], "--log-format") == "json"
    log = start_log(stepgate_bin, c["args"], c, make_certificate, tmp_path)
    assert "stepgate listening on" in log, f"stepgate did not start with {c['args']}:\n{log}"
    entry = logged_check_callers(log)
    assert entry, f"stepgate does not say whom Check answers:\n{log}"
    networks, sans = check_callers_of(name)
    assert entry["check_from"] == (",".join(networks) or "any")
    assert entry["check_client_san"] == (",".join(sans) or "any")


def test_stepgate_refuses_to_start_with_a_network_with_host_bits(stepgate_bin, make_certificate, tmp_path):
    # The chart passes the networks as written; stepgate checks them at start, so a pod given a
    # network with bits set past its prefix exits at once, saying what to write instead.
    values = case_values("network-policy")
    values["checkCallers"]["networks"] = ["10.0.0.0/8", "10.1.2.3/8"]
    c = container(chart_render.template(values))
    assert arg_values(c["args"], "--check-from") == ["10.0.0.0/8", "10.1.2.3/8"]
    log = start_log(stepgate_bin, c["args"], c, make_certificate, tmp_path)
    assert "stepgate listening on" not in log, "stepgate started with 10.1.2.3/8"
    assert "10.1.2.3/8 has bits set past its /8 prefix" in log, log


def test_check_client_sans_without_mutual_tls_would_keep_stepgate_from_starting(stepgate_bin, make_certificate, tmp_path):
    # Why the chart refuses checkCallers.clientSANs without tls.clientCA.enabled: stepgate takes
    # --check-client-san only with --client-ca, and the pods would exit at once.
    name = "tls-cert-manager-mtls"
    c = container(rendered(name))
    args = without(c["args"], "--client-ca")
    log = start_log(stepgate_bin, args, c, make_certificate, tmp_path)
    assert "stepgate listening on" not in log and "--client-ca" in log, log
    values = case_values(name)
    values["tls"]["clientCA"]["enabled"] = False
    del values["tls"]["clientSANs"]
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "checkCallers.clientSANs needs tls.enabled: true and tls.clientCA.enabled: true" in str(refused.value)


def risk_policy(**signals: dict[str, Any]) -> dict[str, Any]:
    return {"policy": {"risk": {"signals": signals}}}


FORGED_TOKENS = {"count": "invalid_token", "key": "source", "window": "1m", "threshold": 50, "action": "block", "block_for": "15m"}
TOKEN_REPLAY = {"count": "sources", "key": "token", "window": "10m", "threshold": 3, "action": "log"}
REPEATED_STEP_UPS = {"count": "step_up", "key": "subject", "window": "10m", "threshold": 5, "action": "log"}


def test_notes_warn_when_signals_trust_sources_that_any_caller_of_check_names():
    warning = "WARNING: the policy's risk signal"
    r = chart_render.template(risk_policy(forged_tokens=FORGED_TOKENS, repeated_step_ups=REPEATED_STEP_UPS))
    assert "WARNING: the policy's risk signal forged_tokens trusts the source address the caller of" in r.notes
    assert "checkCallers.networks" in r.notes and "AuthorizationPolicy" in r.notes
    assert "repeated_step_ups" not in r.notes
    r = chart_render.template(risk_policy(forged_tokens=FORGED_TOKENS, token_replay=TOKEN_REPLAY))
    assert "risk signals forged_tokens, token_replay trust the source address" in r.notes
    # Not when a signal counts no source, nor once checkCallers names the callers.
    assert warning not in chart_render.template(risk_policy(repeated_step_ups=REPEATED_STEP_UPS)).notes
    narrowed = risk_policy(token_replay=TOKEN_REPLAY) | {"checkCallers": {"networks": ["10.0.0.0/8"]}}
    assert warning not in chart_render.template(narrowed).notes
    narrowed = case_values("tls-cert-manager-mtls") | risk_policy(token_replay=TOKEN_REPLAY)
    assert warning not in chart_render.template(narrowed).notes
    # A policy of one's own ConfigMap: the chart cannot tell.
    own = risk_policy(forged_tokens=FORGED_TOKENS) | {"existingPolicyConfigMap": "mine"}
    assert warning not in chart_render.template(own).notes
    for name in CASES:
        assert warning not in rendered(name).notes, name


def test_notes_warn_when_nothing_restricts_who_reaches_the_grpc_port():
    warning = "WARNING: neither networkPolicy nor checkCallers restricts who reaches the gRPC port"
    assert warning in chart_render.template({}).notes
    for values in (
        {"networkPolicy": {"enabled": True, "grpcNamespaces": ["gateways"]}},
        {"checkCallers": {"networks": ["10.0.0.0/8"]}},
    ):
        assert warning not in chart_render.template(values).notes, values
    for name in CASES:
        c = case_values(name)
        restricted = (
            c.get("networkPolicy", {}).get("enabled")
            or c.get("checkCallers", {}).get("networks")
            or c.get("checkCallers", {}).get("clientSANs")
        )
        assert (warning in rendered(name).notes) == (not restricted), name


def test_notes_warn_when_the_service_reaches_outside_the_cluster():
    warning = "opens the gRPC port and the metrics port to callers outside the\n  cluster, in plaintext"
    for kind in ("LoadBalancer", "NodePort"):
        notes = chart_render.template({"service": {"type": kind}}).notes
        assert f"WARNING: service.type {kind} {warning}" in notes, notes
    for name in CASES:
        assert "WARNING: service.type" not in rendered(name).notes, name
    # With TLS on, the warning says so and stays.
    values = case_values("tls-secret") | {"service": {"type": "LoadBalancer"}}
    notes = chart_render.template(values).notes
    assert "WARNING: service.type LoadBalancer opens the gRPC port" in notes
    assert "in plaintext" not in notes.split("WARNING: service.type")[1].split("WARNING")[0]


def test_notes_warn_when_admin_calls_travel_in_plaintext():
    warning = "WARNING: admin.enabled without tls.enabled"
    for name in CASES:
        plaintext_admin = name in ADMIN_CASES and not CASES[name].tls
        assert (warning in rendered(name).notes) == plaintext_admin, name
    assert warning in rendered("admin").notes


def test_notes_warn_that_check_callers_leave_decide_open():
    # checkCallers narrows Check only: Decide stays open to every pod without the NetworkPolicy.
    warning = "WARNING: checkCallers restricts Check only"
    assert warning in chart_render.template({"checkCallers": {"networks": ["10.0.0.0/8"]}}).notes
    for values in (
        {},
        {"networkPolicy": {"enabled": True, "grpcNamespaces": ["gateways"]}},
        {"networkPolicy": {"enabled": True, "grpcNamespaces": ["gateways"]}, "checkCallers": {"networks": ["10.0.0.0/8"]}},
    ):
        assert warning not in chart_render.template(values).notes, values


@pytest.mark.parametrize("name", [name for name in CASES if CASES[name].mutual_tls])
def test_notes_envoy_client_certificate_must_name_a_check_caller_san(name):
    _, sans = check_callers_of(name)
    said = "# To call Check it must name one of checkCallers.clientSANs." in rendered(name).notes
    assert said == bool(sans)


# ---------------------------------------------------------------------------------------------
# The admin listener


ADMIN_PORT_NAME = "grpc-admin"
OPERATOR_SAN = "spiffe://cluster.local/ns/security/sa/incident-response"


def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))


def admin_port(values: dict[str, Any]) -> int:
    return values.get("admin", {}).get("port", chart_defaults()["admin"]["port"])


def admin_services(r: Rendered) -> list[dict]:
    return [s for s in r.of_kind("Service") if s is not main_service(r)]


def ingress_rules_for(policy: dict, port: str | int) -> list[dict]:
    return [rule for rule in policy["spec"]["ingress"] if any(p["port"] == port for p in rule.get("ports", []))]


def rule_namespaces(rule: dict) -> list[str]:
    return [
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in rule["from"]
        if "namespaceSelector" in p
    ]


def admin_values_with(base: str, **network_policy: Any) -> dict[str, Any]:
    """Case `base`'s values with networkPolicy's keys replaced."""
    values = yaml.safe_load(yaml.safe_dump(case_values(base)))
    values.setdefault("networkPolicy", {}).update(network_policy)
    return values


def test_admin_defaults_are_off_on_50052_and_open_to_no_namespace():
    defaults = chart_defaults()
    assert defaults["admin"] == {"enabled": False, "port": 50052}
    assert defaults["networkPolicy"]["adminFromNamespaces"] == []
    assert "adminListen" not in defaults


def test_admin_cases_are_the_values_files_that_enable_it():
    enabled = [name for name in CASES if case_values(name).get("admin", {}).get("enabled")]
    assert enabled == ADMIN_CASES
    assert any(CASES[name].tls for name in ADMIN_CASES) and any(not CASES[name].tls for name in ADMIN_CASES)
    assert any(case_values(name).get("networkPolicy", {}).get("enabled") for name in ADMIN_CASES)


@pytest.mark.parametrize("name", [n for n in CASES if n not in ADMIN_CASES])
def test_no_admin_listener_unless_enabled(name):
    r = rendered(name)
    c = container(r)
    assert not arg_values(c["args"], "--admin-listen")
    assert ADMIN_PORT_NAME not in [p["name"] for p in c["ports"]]
    assert r.of_kind("Service") == [main_service(r)]
    assert "Admin API" not in r.notes and "admin.enabled" not in r.notes
    for policy in r.of_kind("NetworkPolicy"):
        assert not ingress_rules_for(policy, ADMIN_PORT_NAME)


def test_an_empty_admin_listen_of_older_values_is_still_accepted():
    r = chart_render.template({"adminListen": ""})
    assert not arg_values(container(r)["args"], "--admin-listen")


@pytest.mark.parametrize("name", ADMIN_CASES)
def test_admin_listener_has_its_own_port_and_service(name):
    r = rendered(name)
    c = container(r)
    port = admin_port(case_values(name))
    # Every address of the pod: the admin Service and port-forward reach it on the pod's IP.
    assert arg_value(c["args"], "--admin-listen") == f"0.0.0.0:{port}"
    assert container_port(c, ADMIN_PORT_NAME) == port
    _, listen = port_of(arg_value(c["args"], "--listen"))
    _, metrics = port_of(arg_value(c["args"], "--metrics-listen"))
    assert port not in (listen, metrics)

    # Not on the Service the mesh, the gateways and Envoy call.
    main = main_service(r)
    for p in main["spec"]["ports"]:
        assert p["name"] != ADMIN_PORT_NAME and p["port"] != port
        assert p["targetPort"] not in (ADMIN_PORT_NAME, port)

    [admin] = admin_services(r)
    assert admin["metadata"]["name"] == f"{fullname(r)}-admin"
    assert admin["spec"]["type"] == "ClusterIP"
    assert admin["spec"]["ports"] == [
        {"name": ADMIN_PORT_NAME, "appProtocol": "grpc", "port": port, "targetPort": ADMIN_PORT_NAME, "protocol": "TCP"}
    ]
    assert admin["spec"]["selector"] == main["spec"]["selector"]
    assert admin["spec"]["selector"].items() <= r.one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    # Its labels keep it out of the ServiceMonitor's selector (the main Service's labels).
    assert not main["spec"]["selector"].items() <= admin["metadata"]["labels"].items()


def test_admin_service_stays_cluster_internal_whatever_the_main_service_type():
    r = chart_render.template({"admin": {"enabled": True}, "service": {"type": "LoadBalancer"}})
    assert main_service(r)["spec"]["type"] == "LoadBalancer"
    [admin] = admin_services(r)
    assert admin["spec"]["type"] == "ClusterIP"


def test_admin_service_name_fits_a_dns_label():
    r = chart_render.template({"admin": {"enabled": True}, "fullnameOverride": "s" * 63})
    [admin] = admin_services(r)
    assert admin["metadata"]["name"] == "s" * 57 + "-admin"
    forward, _ = notes_admin_commands(r)
    assert forward[4] == f"svc/{admin['metadata']['name']}"


def test_service_monitor_does_not_select_the_admin_service():
    values = case_values("admin") | case_values("service-monitor")
    r = chart_render.template(values, api_versions=[SERVICE_MONITOR_API])
    selector = r.one("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= main_service(r)["metadata"]["labels"].items()
    [admin] = admin_services(r)
    assert not selector.items() <= admin["metadata"]["labels"].items()


def test_network_policy_opens_the_admin_port_only_to_the_admin_namespaces():
    name = "admin-tls-network-policy"
    values = case_values(name)
    r = rendered(name)
    policy = r.one("NetworkPolicy")
    port = admin_port(values)
    assert container_port(container(r), ADMIN_PORT_NAME) == port
    # Every rule names its sources and its ports: a rule without `from` lets in every source, one
    # without `ports` every port.
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), rule
    [admin_rule] = ingress_rules_for(policy, ADMIN_PORT_NAME)
    assert admin_rule["ports"] == [{"port": ADMIN_PORT_NAME, "protocol": "TCP"}]
    assert all(set(p) == {"namespaceSelector"} for p in admin_rule["from"]), "only namespaces, not the test pod"
    assert rule_namespaces(admin_rule) == values["networkPolicy"]["adminFromNamespaces"] == ["security"]
    assert not ingress_rules_for(policy, port), "the admin port is named, never numbered"
    # The gRPC port's callers (the mesh, the gateways) do not reach the admin port.
    [grpc_rule] = ingress_rules_for(policy, "grpc")
    assert rule_namespaces(grpc_rule) == values["networkPolicy"]["grpcNamespaces"]
    assert not set(rule_namespaces(grpc_rule)) & set(rule_namespaces(admin_rule))
    assert f"{fullname(r)}-admin.{r.namespace}.svc:{port}" in r.notes
    assert "opens to\n  namespace security only" in r.notes


def test_network_policy_opens_the_admin_port_to_nobody_by_default():
    values = admin_values_with("admin-tls-network-policy", adminFromNamespaces=[])
    r = chart_render.template(values)
    policy = r.one("NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), rule
    assert not ingress_rules_for(policy, ADMIN_PORT_NAME)
    assert not ingress_rules_for(policy, admin_port(values))
    # Still listening and on its Service, for kubectl port-forward.
    assert container_port(container(r), ADMIN_PORT_NAME) == admin_port(values)
    assert len(admin_services(r)) == 1
    assert "opens the admin port to no namespace" in r.notes and "port-forward" in r.notes


def test_network_policy_opens_the_admin_port_to_each_listed_namespace():
    values = admin_values_with("admin-tls-network-policy", adminFromNamespaces=["security", "sre"])
    r = chart_render.template(values)
    [admin_rule] = ingress_rules_for(r.one("NetworkPolicy"), ADMIN_PORT_NAME)
    assert rule_namespaces(admin_rule) == ["security", "sre"]
    assert "namespaces security, sre only" in r.notes


def test_notes_warn_when_the_admin_port_is_open_to_the_cluster_or_nobody_may_call():
    r = rendered("admin")
    assert not r.of_kind("NetworkPolicy")
    assert "WARNING: admin.enabled without networkPolicy.enabled" in r.notes
    assert "no `admin:` section" not in r.notes
    values = case_values("admin")
    del values["policy"]
    bare = chart_render.template(values)
    assert "WARNING: admin.enabled, but the policy has no `admin:` section" in bare.notes
    assert "no `admin:` section" not in rendered("admin-tls-network-policy").notes
    assert "without networkPolicy.enabled" not in rendered("admin-tls-network-policy").notes
    # A policy of one's own ConfigMap: the chart cannot tell, so only the reminder.
    own = chart_render.template({"admin": {"enabled": True}, "existingPolicyConfigMap": "mine"})
    assert "no `admin:` section" not in own.notes and "must name the callers" in own.notes


def notes_admin_commands(r: Rendered) -> tuple[list[str], list[str]]:
    """NOTES' `kubectl port-forward` and `stepgate admin list` commands, as argument lists."""
    forward = [line for line in r.notes.splitlines() if "port-forward svc/" in line]
    listing = [line for line in r.notes.splitlines() if line.strip().startswith("stepgate admin list")]
    assert len(forward) == 1 and len(listing) == 1, r.notes
    assert forward[0].startswith("    ") and listing[0].startswith("    "), "commands are indented four spaces"
    return shlex.split(forward[0]), shlex.split(listing[0])


def run_admin(stepgate_bin: str, args: list[str]) -> subprocess.CompletedProcess:
    """`stepgate admin …` with no STEPGATE_ADMIN_* variable of the environment standing in for a
    flag the command leaves out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPGATE_ADMIN_")}
    try:
        return subprocess.run([stepgate_bin, *args], capture_output=True, text=True, timeout=30, cwd="/", env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"stepgate admin took longer than 30 s: {args}")


def mint_token(stepgate_bin: str, *flags: str) -> str:
    result = subprocess.run(
        [stepgate_bin, "token", "--issuer", "entra", *flags], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# (case whose Secrets the stepgate pods mount, extra values): the two admin values files, and TLS
# without mutual TLS, whose admin command authenticates with a bearer token over TLS.
ADMIN_RUNS = {
    "admin": ("admin", {}),
    "admin-tls-network-policy": ("admin-tls-network-policy", {}),
    "tls-cert-manager+admin": ("tls-cert-manager", {"admin": {"enabled": True, "port": 50070}}),
}


@pytest.mark.parametrize("run", ADMIN_RUNS)
def test_notes_admin_command_works_against_stepgate_started_with_the_charts_arguments(run, stepgate_bin, pki, tmp_path):
    # NOTES' port-forward and `stepgate admin list`, run as printed against stepgate started
    # with the chart's arguments: port-forward lands on the admin Service's port, and the command
    # (scheme, --ca, --tls-server-name, client certificate or token) gets through that listener's
    # TLS and the policy's admin section. Then the same command is refused on the main listener
    # and without its credential, so the success is the admin listener's and the credential's.
    base, extra = ADMIN_RUNS[run]
    values = case_values(base) | extra
    r = rendered(base) if not extra else chart_render.template(values)
    case = CASES[base]
    port = admin_port(values)
    [admin] = admin_services(r)

    forward, command = notes_admin_commands(r)
    assert forward == ["kubectl", "-n", r.namespace, "port-forward", f"svc/{admin['metadata']['name']}", str(port)]
    assert admin["spec"]["ports"][0]["port"] == port
    assert command[:3] == ["stepgate", "admin", "list"]
    args = command[1:]
    scheme = "https" if case.tls else "http"
    assert arg_value(args, "--server") == f"{scheme}://127.0.0.1:{port}"

    secrets = case_secrets(base, pki) if case.tls else {}
    files: dict[str, str] = {}
    if case.tls:
        server_ca = pki.cas["server-ca"]
        files["ca.crt"] = str(server_ca[0])
        assert arg_value(args, "--tls-server-name") == server_name(base)
    if case.mutual_tls:
        # The client CA is the issuer's own (tls.clientCA names no Secret of its own).
        assert not tls_values(base)["clientCA"].get("secretName")
        operator = pki.issue(pki.cas["server-ca"], "operator", [san_entry(OPERATOR_SAN)], ["clientAuth"])
        files["operator.crt"], files["operator.key"] = map(str, operator)
        assert OPERATOR_SAN in tls_values(base)["clientSANs"]
        assert OPERATOR_SAN in values["policy"]["admin"]["client_sans"]
        assert not arg_values(args, "--bearer")
    else:
        assert arg_value(args, "--bearer") == "$TOKEN"
        files["$TOKEN"] = mint_token(stepgate_bin, "--roles", "stepgate.admin")
    assert {a for a in args if a in files} == set(files), f"NOTES' command names other files: {args}"
    args = [files.get(a, a) for a in args]

    # The policy: the demo one (its keys are files), with an admin section naming the callers.
    policy = demo_policy() + (
        "\nadmin:\n"
        f"  client_sans: [{json.dumps(OPERATOR_SAN)}]\n"
        "  issuers: [demo-entra]\n"
        "  roles: [stepgate.admin]\n"
    )
    with started_stepgate(stepgate_bin, r, tmp_path / "pod", secrets, policy=policy) as started:
        assert started.admin_url, f"no admin listener:\n{''.join(started.log)}"
        assert started.admin_url.startswith(f"{scheme}://"), "the admin listener has the main listener's TLS"
        local = with_value(args, "--server", started.admin_url)
        result = run_admin(stepgate_bin, local)
        assert result.returncode == 0, f"stepgate {' '.join(local)}\n{result.stdout}{result.stderr}"
        assert isinstance(json.loads(result.stdout), dict), result.stdout

        on_main = with_value(args, "--server", f"{scheme}://{started.address}")
        result = run_admin(stepgate_bin, on_main)
        assert result.returncode == 1 and "PermissionDenied" in result.stderr, (
            f"the main listener answered the admin API otherwise than refusing it:\n{result.stdout}{result.stderr}"
        )

        if case.mutual_tls:
            # A certificate the handshake accepts (in tls.clientSANs) that the admin section does
            # not name; and none at all.
            gateway_san = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
            assert gateway_san in tls_values(base)["clientSANs"]
            gateway = pki.issue(pki.cas["server-ca"], "gateway", [san_entry(gateway_san)], ["clientAuth"])
            refused = [
                (with_value(with_value(local, "--cert", str(gateway[0])), "--key", str(gateway[1])), "PermissionDenied"),
                (without(without(local, "--cert"), "--key"), ""),  # the handshake fails
            ]
        else:
            refused = [
                (with_value(local, "--bearer", mint_token(stepgate_bin, "--roles", "reader")), "PermissionDenied"),
                (without(local, "--bearer"), "Unauthenticated"),
            ]
        if case.tls:
            refused.append((without(local, "--tls-server-name"), ""))  # 127.0.0.1 is not on the certificate
        for attempt, why in refused:
            result = run_admin(stepgate_bin, attempt)
            assert result.returncode == 1 and why in result.stderr, (
                f"admin list with {attempt}:\n{result.stdout}{result.stderr}"
            )


# ---------------------------------------------------------------------------------------------
# NOTES.txt and `helm test`


@pytest.mark.parametrize("name", CASES)
def test_notes_istio_provider_points_at_the_service(name):
    r = rendered(name)
    mesh = notes_snippet(r.notes, "meshConfig:")
    [entry] = mesh["meshConfig"]["extensionProviders"]
    provider = entry["envoyExtAuthzGrpc"]
    assert set(provider) <= GRPC_PROVIDER_FIELDS
    service = main_service(r)["metadata"]["name"]
    assert provider["service"] == f"{service}.{r.namespace}.svc.cluster.local"
    assert provider["port"] == service_port(r, "grpc")["port"] == GRPC_PORT
    assert provider["failOpen"] is False and provider["statusOnError"] == "503"


@pytest.mark.parametrize("name", CASES)
def test_notes_envoy_cluster_is_valid_envoy_config(name, envoy_bin, make_certificate, tmp_path):
    r = rendered(name)
    clusters = notes_snippet(r.notes, "clusters:")["clusters"]
    [cluster] = clusters
    service = main_service(r)["metadata"]["name"]
    fqdn = f"{service}.{r.namespace}.svc.cluster.local"
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": fqdn, "port_value": GRPC_PORT}
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC needs HTTP/2"
    tls = cluster.get("transport_socket")
    assert (tls is not None) == CASES[name].tls
    if tls:
        context = tls["typed_config"]
        assert context["sni"] == server_name(name)
        [san] = context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
        assert san == {"san_type": "DNS", "matcher": {"exact": server_name(name)}}
        assert server_name(name) in certificate_names(name)
        has_client_cert = "tls_certificates" in context["common_tls_context"]
        assert has_client_cert == CASES[name].mutual_tls

    # The files the snippet names, so that Envoy can load them.
    make_certificate(tmp_path, "ca", "ca.test")
    make_certificate(tmp_path, "client", "envoy.test")
    text = yaml.safe_dump({"static_resources": {"clusters": clusters}}).replace("/etc/envoy/stepgate/", f"{tmp_path}/")
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(bootstrap), "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and "OK" in result.stdout, f"Envoy refuses the cluster:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", CASES)
def test_helm_test_pod_asks_health_through_the_service(name, stepgate_bin):
    r = rendered(name)
    pod = helm_test_pod(r)
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    [c] = pod["spec"]["containers"]
    assert c["image"] == container(r)["image"], "the test runs stepgate's own image (distroless: no shell)"
    assert "command" not in c and c["args"][0] == "health"
    args = c["args"][1:]
    assert flags(args) <= health_flags(stepgate_bin), f"flags stepgate health does not take: {flags(args)}"
    scheme = "https" if CASES[name].tls else "http"
    url = arg_value(args, "--server")
    assert url.startswith(f"{scheme}://"), url
    host, port = port_of(url.removeprefix(f"{scheme}://"))
    service = main_service(r)["metadata"]["name"]
    assert host == f"{service}.{r.namespace}.svc" and port == service_port(r, "grpc")["port"]
    if CASES[name].tls:
        check_health_tls_args(name, pod["spec"], c, args)
        # The pod mounts exactly the files it names: stepgate's key only as its client key.
        named = {a for a in args if a.startswith("/")}
        mounted = {
            f"{m['mountPath']}/{i['path']}"
            for m in c["volumeMounts"]
            for v in pod["spec"]["volumes"] if v["name"] == m["name"]
            for i in v["secret"]["items"]
        }
        assert mounted == named
    else:
        assert flags(args) == {"--server"} and "volumes" not in pod["spec"]
    assert f"helm test {r.release} -n {r.namespace}" in r.notes
    assert "not available" not in r.notes


def test_network_policy_lets_in_the_test_pod_with_tls_too():
    values = case_values("tls-cert-manager-mtls") | case_values("network-policy")
    r = chart_render.template(values)
    [grpc_rule, _] = r.one("NetworkPolicy")["spec"]["ingress"]
    pods = [p["podSelector"]["matchLabels"] for p in grpc_rule["from"] if "podSelector" in p]
    assert len(pods) == 1 and pods[0].items() <= helm_test_pod(r)["metadata"]["labels"].items()


def test_names_follow_the_release():
    r = chart_render.template({}, release="edge", namespace="authz")
    assert fullname(r) == main_service(r)["metadata"]["name"] == "edge-stepgate"
    provider = notes_snippet(r.notes, "meshConfig:")["meshConfig"]["extensionProviders"][0]
    assert provider["envoyExtAuthzGrpc"]["service"] == "edge-stepgate.authz.svc.cluster.local"
    pod = helm_test_pod(r)
    assert arg_value(pod["spec"]["containers"][0]["args"], "--server") == "http://edge-stepgate.authz.svc:50051"
    _, volume = mount_for(r, arg_value(container(r)["args"], "--config"))
    assert volume["configMap"]["name"] == "edge-stepgate-policy" == r.one("ConfigMap")["metadata"]["name"]


def test_extra_volumes_bring_a_secret_the_policy_names_by_path():
    # The records subject key from a Secret, named by its path: the file is in the mounted Secret.
    values = {
        "extraVolumes": [{"name": "records-key", "secret": {"secretName": "stepgate-records-key"}}],
        "extraVolumeMounts": [
            {"name": "records-key", "mountPath": "/etc/stepgate/records-key", "readOnly": True}
        ],
        "policy": {"records": {"subject_key_file": "/etc/stepgate/records-key/key"}},
    }
    r = chart_render.template(values)
    kubernetes_validate.validate(r.one("Deployment"), kubernetes_validate.latest_version(), strict=True)
    mount, volume = mount_for(r, "/etc/stepgate/records-key/key")
    assert mount["readOnly"] is True and "subPath" not in mount
    assert volume["secret"]["secretName"] == "stepgate-records-key"
    assert rendered_policy(r).count("/etc/stepgate/records-key/key") == 1
    # The chart's own mounts are still there.
    mount_for(r, arg_value(container(r)["args"], "--config"))


def test_an_extra_volume_mount_by_subpath_is_refused():
    # A subPath mount is a copy made at start: a rotated Secret would never reach the pod.
    values = {
        "extraVolumes": [{"name": "k", "secret": {"secretName": "s"}}],
        "extraVolumeMounts": [{"name": "k", "mountPath": "/etc/k/key", "subPath": "key"}],
    }
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "subPath" in str(refused.value), refused.value
    # Nor a volume of the node's files: a Secret, a ConfigMap or an emptyDir only.
    with pytest.raises(HelmError) as refused:
        chart_render.template({"extraVolumes": [{"name": "h", "hostPath": {"path": "/"}}]})
    assert "hostPath" in str(refused.value), refused.value


# ---------------------------------------------------------------------------------------------
# The policy check before an install or upgrade


def hook_weight(d: dict) -> int:
    return int(d["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))


@pytest.mark.parametrize("name", WITH_RENDERED_POLICY)
def test_the_policy_check_runs_before_anything_changes_on_the_policy_the_pods_get(name):
    r = rendered(name)
    job = check_job(r)
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    # A failed check is kept for its log, and Helm prints the log.
    assert "hook-failed" not in annotations["helm.sh/hook-delete-policy"]
    assert annotations["helm.sh/hook-output-log-policy"] == "hook-failed"
    assert job["spec"]["backoffLimit"] == 0 and 0 < job["spec"]["activeDeadlineSeconds"] < 300
    # An evicted or preempted pod is no verdict.
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in job["spec"]["podFailurePolicy"]["rules"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    # Before an install the release's ServiceAccount does not exist yet.
    assert "serviceAccountName" not in spec
    pod_annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["sidecar.istio.io/inject"] == "false"
    [c] = spec["containers"]
    assert c["image"] == container(r)["image"]
    assert c["args"][:2] == ["check", "--config"]
    mount, volume = mount_in(spec, c, c["args"][2])
    served_mount, served_volume = mount_for(r, arg_value(container(r)["args"], "--config"))
    assert mount["mountPath"] == served_mount["mountPath"]
    checked = hook_of(r, "ConfigMap")
    # Created before the Job, and holding exactly the policy the pods will read.
    assert hook_weight(checked) < hook_weight(job)
    assert checked["metadata"]["annotations"]["helm.sh/hook"] == annotations["helm.sh/hook"]
    assert volume["configMap"]["name"] == checked["metadata"]["name"]
    assert checked["data"] == next(
        d for d in r.of_kind("ConfigMap") if d["metadata"]["name"] == served_volume["configMap"]["name"]
    )["data"]


def test_the_policy_check_can_be_turned_off_and_is_not_run_on_a_configmap_of_ones_own():
    r = chart_render.template({"policyCheck": {"enabled": False}})
    assert {d["kind"] for d in r.hooks} == {"Pod"}
    # That ConfigMap may not exist before an install (an umbrella chart creating it), and under
    # Argo CD a PreSync check would read its old content.
    assert {d["kind"] for d in rendered("existing-configmap").hooks} == {"Pod"}


def test_the_policy_check_runs_where_the_pods_may_run():
    values = {
        "serviceAccount": {"create": False, "name": "payments-stepgate"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"pool": "auth"},
        "imagePullSecrets": [{"name": "registry"}],
        "policyCheck": {"resources": {"requests": {"cpu": "10m"}, "limits": {"cpu": "100m", "memory": "128Mi"}}},
    }
    r = chart_render.template(values)
    spec = check_job(r)["spec"]["template"]["spec"]
    # A ServiceAccount one names without creating it exists before an install, with its pull
    # secrets; the one the chart creates does not yet.
    assert spec["serviceAccountName"] == "payments-stepgate" == pod_spec(r)["serviceAccountName"]
    assert "serviceAccountName" not in check_job(chart_render.template({}))["spec"]["template"]["spec"]
    for key in ("priorityClassName", "nodeSelector", "imagePullSecrets"):
        assert spec[key] == pod_spec(r)[key], key
    # Helm merges the given map into the default one.
    assert spec["containers"][0]["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"cpu": "100m", "memory": "128Mi"},
    }
    kubernetes_validate.validate(check_job(r), kubernetes_validate.latest_version(), strict=True)


def run_check_job(r: Rendered, stepgate_bin: str, root: Path, secrets: dict[str, dict[str, str]]):
    """Runs the policy check's container as rendered, its volumes written under `root` as the
    kubelet would mount them (the hook ConfigMap's files, `secrets`' keys); the container's
    absolute paths, in its arguments and in the files, become paths under `root`."""
    spec = check_job(r)["spec"]["template"]["spec"]
    [c] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m["mountPath"] for m in c["volumeMounts"]]

    def local(text: str) -> str:
        for path in mounts:
            text = text.replace(path + "/", f"{root}{path}/")
        return text

    for mount in c["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            [source] = [d for d in r.hooks if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
            files = {i["path"]: source["data"][i["key"]] for i in volume["configMap"]["items"]}
        else:
            files = secrets[volume["secret"]["secretName"]]
        directory = Path(f"{root}{mount['mountPath']}")
        directory.mkdir(parents=True, exist_ok=True)
        for file, content in files.items():
            (directory / file).write_text(local(content), encoding="utf-8")
    return subprocess.run(
        [stepgate_bin, *[local(a) for a in c["args"]]], capture_output=True, text=True, timeout=60
    )


def policy_with_a_key_file() -> dict[str, Any]:
    """Values whose policy reads its issuer's keys from a file in a Secret (extraVolumes)."""
    return {
        "extraVolumes": [{"name": "keys", "secret": {"secretName": "stepgate-keys"}}],
        "extraVolumeMounts": [{"name": "keys", "mountPath": "/etc/stepgate/keys", "readOnly": True}],
        "policy": {
            "issuers": [
                {
                    "id": "corp",
                    "issuer": "https://idp.example.com",
                    "jwks_file": "/etc/stepgate/keys/jwks.json",
                    "audiences": ["api://payments"],
                }
            ],
            "rules": [{"id": "everything", "match": [{"path": "/**"}], "require": {"authenticated": True}}],
        },
    }


def test_the_policy_check_passes_a_policy_stepgate_takes_with_the_files_it_names(stepgate_bin, tmp_path):
    r = chart_render.template(policy_with_a_key_file())
    jwks = (REPO / "examples" / "demo-keys" / "jwks.json").read_text(encoding="utf-8")
    result = run_check_job(r, stepgate_bin, tmp_path / "pod", {"stepgate-keys": {"jwks.json": jwks}})
    assert result.returncode == 0, f"the check failed:\n{result.stderr}{result.stdout}"
    assert result.stdout.startswith("policy OK: 1 issuer(s), 1 rule(s)"), result.stdout
    # The key file is read through the Secret the Job mounts: without a usable key in it, it fails.
    result = run_check_job(r, stepgate_bin, tmp_path / "empty", {"stepgate-keys": {"jwks.json": '{"keys": []}'}})
    assert result.returncode == 2, result.stderr
    assert "issuers.corp.jwks_file" in result.stderr and "no usable signing key" in result.stderr


def test_the_policy_check_fails_a_policy_stepgate_refuses_naming_the_field(stepgate_bin, tmp_path):
    # The values schema knows the policy's sections only; a misspelt field inside a rule renders,
    # and only stepgate's own check refuses it, before any pod reads it.
    values = policy_with_a_key_file()
    values["policy"]["rules"][0]["requier"] = values["policy"]["rules"][0].pop("require")
    r = chart_render.template(values)
    jwks = (REPO / "examples" / "demo-keys" / "jwks.json").read_text(encoding="utf-8")
    result = run_check_job(r, stepgate_bin, tmp_path / "pod", {"stepgate-keys": {"jwks.json": jwks}})
    assert result.returncode == 2, f"the check passed:\n{result.stdout}"
    assert "rules[0]" in result.stderr and "requier" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Refusals


TYPOS = [
    ({"replicaCuont": 3}, "replicaCuont"),
    ({"tls": {"secretNme": "stepgate-tls"}}, "secretNme"),
    ({"tls": {"certManager": {"issuerRef": {"nmae": "internal-ca"}}}}, "nmae"),
    ({"probes": {"startup": {"failureTreshold": 10}}}, "failureTreshold"),
    ({"extraEnv": [{"name": "A", "vaule": "1"}]}, "vaule"),
    ({"policy": {"rule": []}}, "rule"),
    ({"admin": {"enabeld": True}}, "enabeld"),
    ({"admni": {"enabled": True}}, "admni"),
    ({"networkPolicy": {"adminFromNamespace": ["security"]}}, "adminFromNamespace"),
    ({"checkCallers": {"netwroks": ["10.0.0.0/8"]}}, "netwroks"),
    ({"checkCallers": {"clientSAN": ["spiffe://a"]}}, "clientSAN"),
    ({"checkCaller": {"networks": ["10.0.0.0/8"]}}, "checkCaller"),
]


@pytest.mark.parametrize(("values", "key"), TYPOS, ids=[k for _, k in TYPOS])
def test_misspelt_value_is_refused_by_template_and_lint(values, key):
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    message = str(refused.value)
    assert "schema" in message and repr(key) in message, message
    findings = chart_render.lint(values)
    assert any(repr(key) in f for f in findings), findings


WRONG_TYPES = [
    ({"replicaCount": "three"}, "replicaCount"),
    ({"readyWhen": "sometimes"}, "readyWhen"),
    ({"tls": {"enabled": "yes"}}, "enabled"),
    ({"tracing": {"sampler": "often"}}, "sampler"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"admin": {"enabled": "true"}}, "enabled"),
    ({"admin": {"port": 70000}}, "port"),
    ({"networkPolicy": {"adminFromNamespaces": ["Security Team"]}}, "adminFromNamespaces"),
    ({"checkCallers": {"networks": "10.0.0.0/8"}}, "networks"),
    ({"checkCallers": {"clientSANs": [""]}}, "clientSANs"),
    ({"podDisruptionBudget": {"minAvailable": "half"}}, "minAvailable"),
    ({"podDisruptionBudget": {"maxUnavailable": -1}}, "maxUnavailable"),
    ({"policyCheck": {"activeDeadlineSeconds": 0}}, "activeDeadlineSeconds"),
]


@pytest.mark.parametrize(("values", "key"), WRONG_TYPES, ids=[k for _, k in WRONG_TYPES])
def test_value_of_the_wrong_type_is_refused(values, key):
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "schema" in str(refused.value) and key in str(refused.value)


INCONSISTENT = [
    ({"drainDelaySeconds": 60}, "must exceed drainDelaySeconds"),
    ({"tls": {"enabled": True}}, "tls.secretName"),
    ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "issuerRef.name"),
    ({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}, "needs tls.enabled"),
    ({"tls": {"enabled": True, "secretName": "s", "clientSANs": ["a"]}}, "tls.clientCA.enabled"),
    (
        {"tls": {"enabled": True, "secretName": "s", "clientCA": {"enabled": True}, "clientSANs": ["spiffe://a"]}},
        "tls.clientSANs must list stepgate.auth.svc.cluster.local",
    ),
    (
        {"tls": {"enabled": True, "serverName": "other.example", "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
        "is not one of the Certificate's names",
    ),
    ({"tls": {"enabled": True, "secretName": "s", "probeClient": {"secretName": "p"}}}, "tls.probeClient.secretName needs"),
    (
        {"checkCallers": {"clientSANs": ["spiffe://a"]}},
        "checkCallers.clientSANs needs tls.enabled: true and tls.clientCA.enabled: true",
    ),
    (
        {"tls": {"enabled": True, "secretName": "s"}, "checkCallers": {"clientSANs": ["spiffe://a"]}},
        "checkCallers.clientSANs needs tls.enabled: true and tls.clientCA.enabled: true (only a client certificate",
    ),
    (
        {
            "tls": {
                "enabled": True,
                "secretName": "s",
                "clientCA": {"enabled": True},
                "clientSANs": ["stepgate.auth.svc.cluster.local", "spiffe://gw"],
            },
            "checkCallers": {"clientSANs": ["spiffe://other-gw"]},
        },
        "checkCallers.clientSANs names spiffe://other-gw, which tls.clientSANs does not",
    ),
    ({"tls": {"serverName": "stepgate.example"}}, "tls.serverName and tls.serverCA need tls.enabled"),
    ({"networkPolicy": {"enabled": True}}, "networkPolicy.grpcNamespaces"),
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": 2}}, "no node could ever be drained"),
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": None}}, "set minAvailable or maxUnavailable"),
    ({"podDisruptionBudget": {"maxUnavailable": 0}}, "podDisruptionBudget.maxUnavailable (0) lets no pod be evicted"),
    ({"podDisruptionBudget": {"maxUnavailable": "0%"}}, "podDisruptionBudget.maxUnavailable (0%) lets no pod be evicted"),
    ({"podDisruptionBudget": {"minAvailable": "100%"}}, "minAvailable (100%) of 2 replicas rounds up to every one of them"),
    # 51 % of 2 pods rounds up to 2.
    ({"podDisruptionBudget": {"minAvailable": "51%"}}, "use at most 50%"),
    (
        {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 8}, "podDisruptionBudget": {"minAvailable": "80%"}},
        "minAvailable (80%) of 4 replicas rounds up to every one of them",
    ),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}, "must not exceed"),
    ({"serviceMonitor": {"enabled": True}, "metrics": {"enabled": False}}, "needs metrics.enabled"),
    ({"policy": None}, "set policy"),
    ({"adminListen": "127.0.0.1:50052"}, "adminListen is replaced by admin.enabled and admin.port"),
    ({"admin": {"enabled": True, "port": 50051}}, "admin.port (50051) must differ from service.port"),
    ({"admin": {"enabled": True, "port": 9464}}, "admin.port (9464) must differ from metrics.port"),
    (
        {"networkPolicy": {"enabled": True, "grpcNamespaces": ["payments"], "adminFromNamespaces": ["security"]}},
        "networkPolicy.adminFromNamespaces needs admin.enabled",
    ),
    (
        {"admin": {"enabled": True}, "networkPolicy": {"adminFromNamespaces": ["security"]}},
        "networkPolicy.adminFromNamespaces needs networkPolicy.enabled",
    ),
    (
        {
            "admin": {"enabled": True},
            "networkPolicy": {
                "enabled": True, "grpcNamespaces": ["istio-system", "payments"],
                "adminFromNamespaces": ["security", "istio-system"],
            },
        },
        'networkPolicy.adminFromNamespaces must not list "istio-system"',
    ),
]


@pytest.mark.parametrize(("values", "message"), INCONSISTENT, ids=[m for _, m in INCONSISTENT])
def test_inconsistent_values_are_refused_with_what_to_change(values, message):
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert message in str(refused.value)


def test_grace_period_follows_the_drain_delay():
    r = chart_render.template({"drainDelaySeconds": 20, "requestTimeoutSeconds": 2})
    assert pod_spec(r)["terminationGracePeriodSeconds"] == 20 + 2 + 5
    assert arg_value(container(r)["args"], "--drain-delay") == "20s"


# ---------------------------------------------------------------------------------------------
# The shared risk store


def test_the_risk_store_url_comes_from_a_secret():
    r = rendered("risk-store")
    env = env_of(r)
    assert env["STEPGATE_RISK_STORE"] == {"secretKeyRef": {"name": "stepgate-redis", "key": "redis-url"}}
    assert "risk:" in rendered_policy(r) and "repeated_step_ups" in rendered_policy(r)
    assert "STEPGATE_RISK_STORE" not in env_of(rendered("default"))


def test_a_plain_risk_store_url_is_set_and_one_with_a_password_is_refused():
    values = case_values("default")
    values["riskStore"] = {"url": "redis://redis-master.redis:6379/0"}
    r = chart_render.template(values)
    assert env_of(r)["STEPGATE_RISK_STORE"] == "redis://redis-master.redis:6379/0"
    values["riskStore"] = {"url": "redis://:hunter2@redis-master.redis:6379/0"}
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "riskStore.url holds a password" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    # Nor in the query, where a Unix socket URL carries it (the chart's schema takes TCP URLs).
    values["riskStore"] = {"url": "redis://redis-master.redis:6379/0?pass=hunter2"}
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "riskStore.url holds a password" in str(refused.value)
    # Nor in the policy, which the chart renders into a ConfigMap.
    values["riskStore"] = {}
    values["policy"] = dict(values.get("policy") or {})
    values["policy"]["risk"] = {"store": "redis://:hunter2@redis-master.redis:6379/0"}
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "policy.risk.store holds a password" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    values["policy"]["risk"] = {"store": "redis://redis-master.redis:6379/0"}
    assert "redis://redis-master.redis:6379/0" in str(chart_render.template(values))
    values["riskStore"] = {"url": "memcached://cache:11211"}
    with pytest.raises(HelmError):
        chart_render.template(values)


def test_a_sentinel_risk_store_url_is_set_and_one_with_a_password_is_refused():
    values = case_values("default")
    url = "redis+sentinel://redis.redis:26379,redis-1.redis:26379/mymaster/0"
    values["riskStore"] = {"url": url}
    assert env_of(chart_render.template(values))["STEPGATE_RISK_STORE"] == url
    values["riskStore"] = {"url": "redis+sentinel://:hunter2@redis.redis:26379/mymaster/0"}
    with pytest.raises(HelmError) as refused:
        chart_render.template(values)
    assert "riskStore.url holds a password" in str(refused.value)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("escape", "where"),
    [
        ({"extraArgs": ["--risk-store", "redis://:hunter2@redis:6379/0"]}, "extraArgs"),
        ({"extraArgs": ["--risk-store=redis://:hunter2@redis:6379/0"]}, "extraArgs"),
        ({"extraEnv": [{"name": "STEPGATE_RISK_STORE", "value": "redis://redis:6379/0?password=hunter2"}]}, "extraEnv"),
    ],
    ids=["arg", "arg=", "env"],
)
def test_a_risk_store_password_in_the_escape_hatches_is_refused(escape, where):
    with pytest.raises(HelmError) as refused:
        chart_render.template(escape)
    assert f"{where}:" in str(refused.value) and "holds a password" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_risk_store_without_a_password_in_the_escape_hatches_is_passed_on():
    r = chart_render.template({
        "extraArgs": ["--risk-store", "redis://redis:6379/0", "--idle-timeout", "60s"],
        "extraEnv": [
            {"name": "STEPGATE_RISK_STORE", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}},
        ],
    })
    assert container(r)["args"][-4:] == ["--risk-store", "redis://redis:6379/0", "--idle-timeout", "60s"]
    assert env_of(r)["STEPGATE_RISK_STORE"] == {"secretKeyRef": {"name": "redis", "key": "url"}}
