"""Invariants that tie the three Istio example files together.

Each file is valid on its own; the integration breaks when one of them is edited and the others are
not. These tests fail on exactly those edits:

- the AuthorizationPolicy names a provider that the mesh config defines;
- the provider points at the stepgate Service (name.namespace.svc.cluster.local) and its gRPC port;
- the provider fails closed, answers 503 on error and has an explicit, short timeout;
- the Service targets the port stepgate listens on, and selects the Deployment's pods;
- the policy in the ConfigMap is mounted where `--config` reads it, and the real `stepgate check`
  accepts it;
- the Kubernetes manifest validates with kubernetes-validate (strict: unknown fields fail).

Run: STEPGATE_BIN=target/debug/stepgate python -m pytest -q examples/istio
(requirements: examples/istio/requirements.txt)
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
MESH_CONFIG = HERE / "mesh-config.yaml"
AUTHZ_POLICY = HERE / "authorization-policy.yaml"
DEPLOYMENT = HERE / "stepgate-deployment.yaml"

# Kubernetes versions the manifest must validate against: the brief's baseline and the newest
# schema set kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "latest"]

# The fields of Istio's EnvoyExternalAuthorizationGrpcProvider (istio/api,
# mesh/v1alpha1/config.proto), in their JSON names. Anything else is a typo Istio would reject.
GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestBodyInCheck",
}
# AuthorizationPolicy Operation fields (istio/api, security/v1beta1/authorization_policy.proto).
OPERATION_FIELDS = {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}

SENSITIVE_PATHS = [
    "/payments",
    "/payments/wire",
    "/admin",
    "/admin/users/42",
    "/customers",
    "/customers/42/pii",
]
OTHER_PATHS = ["/", "/orders/17", "/status", "/grpc.health.v1.Health/Check"]


# ---------------------------------------------------------------------------------------------
# Loading


def load_all(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def mesh() -> dict:
    doc = only(load_all(MESH_CONFIG), "IstioOperator")
    return doc["spec"]["meshConfig"]


@pytest.fixture(scope="module")
def policy_obj() -> dict:
    return only(load_all(AUTHZ_POLICY), "AuthorizationPolicy")


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return load_all(DEPLOYMENT)


@pytest.fixture(scope="module")
def callers() -> list[dict]:
    return load_all(DEPLOYMENT.with_name("stepgate-callers.yaml"))


@pytest.fixture(scope="module")
def deployment(manifest) -> dict:
    return only(manifest, "Deployment")


@pytest.fixture(scope="module")
def service(manifest) -> dict:
    return only(manifest, "Service")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c["name"] == "stepgate"]
    assert len(named) == 1, "the Deployment must have one container named stepgate"
    return named[0]


@pytest.fixture(scope="module")
def provider(mesh, policy_obj) -> dict:
    name = policy_obj["spec"]["provider"]["name"]
    providers = [p for p in mesh.get("extensionProviders", []) if p.get("name") == name]
    assert len(providers) == 1, (
        f"the AuthorizationPolicy uses provider {name!r}; mesh-config.yaml must define it exactly "
        f"once (it defines {[p.get('name') for p in mesh.get('extensionProviders', [])]})"
    )
    assert "envoyExtAuthzGrpc" in providers[0], "stepgate speaks the gRPC ext_authz API"
    return providers[0]["envoyExtAuthzGrpc"]


def arg_value(args: list[str], flag: str) -> str:
    """The value of `--flag value` or `--flag=value` in a container's args."""
    for i, arg in enumerate(args):
        if arg == flag:
            assert i + 1 < len(args), f"{flag} has no value"
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} is missing from the container args {args}")


def split_host_port(addr: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d+)", addr)
    assert m, f"not a host:port address: {addr!r}"
    return m.group(1), int(m.group(2))


def resolve_target_port(port: dict, container: dict) -> int:
    """A Service port's targetPort as a number: named ports resolve through the container."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    named = [p for p in container.get("ports", []) if p.get("name") == target]
    assert named, f"targetPort {target!r} names no port of the stepgate container"
    return named[0]["containerPort"]


def service_port(service: dict, name: str) -> dict:
    ports = [p for p in service["spec"]["ports"] if p.get("name") == name]
    assert len(ports) == 1, f"the Service needs one port named {name!r}"
    return ports[0]


def duration_seconds(text: str) -> float:
    """A protobuf-JSON duration as Istio accepts it in YAML: 250ms, 0.25s, 1s, 1m."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text))
    assert m, f"not a duration: {text!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def istio_string_match(pattern: str, value: str) -> bool:
    """Istio's rule string matching: exact, prefix `abc*`, suffix `*abc`, presence `*`."""
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def sent_to_provider(policy_obj: dict, path: str, method: str | None = None) -> bool:
    """Whether a request for `path` matches a CUSTOM rule: by `method`, or by any method when
    none is given (any host, port, source)."""
    for rule in policy_obj["spec"].get("rules", []):
        if rule.get("from") or rule.get("when"):
            continue  # conditional on the caller: not a guarantee for every request
        tos = rule.get("to")
        if not tos:
            return True  # a rule without `to` matches every operation
        for to in tos:
            op = to.get("operation", {})
            if any(op.get(k) for k in ("hosts", "notHosts", "ports", "notPorts")):
                continue
            if method is None and (op.get("methods") or op.get("notMethods")):
                continue
            if method is not None and "methods" in op and method not in op["methods"]:
                continue
            if method is not None and method in op.get("notMethods", []):
                continue
            if "paths" in op and not any(istio_string_match(p, path) for p in op["paths"]):
                continue
            if any(istio_string_match(p, path) for p in op.get("notPaths", [])):
                continue
            return True
    return False


# ---------------------------------------------------------------------------------------------
# mesh-config.yaml ⇄ authorization-policy.yaml


def test_policy_is_custom_and_names_the_mesh_provider(policy_obj, mesh):
    spec = policy_obj["spec"]
    assert spec["action"] == "CUSTOM"
    name = spec["provider"]["name"]
    defined = [p.get("name") for p in mesh.get("extensionProviders", [])]
    assert defined.count(name) == 1, (
        f"the AuthorizationPolicy uses provider {name!r}; mesh-config.yaml defines {defined}"
    )


def test_provider_uses_only_known_fields(provider):
    unknown = set(provider) - GRPC_PROVIDER_FIELDS
    assert not unknown, f"envoyExtAuthzGrpc has no field(s) {sorted(unknown)}"


def test_provider_fails_closed_with_503_and_a_short_timeout(provider):
    assert provider.get("failOpen") is False, "failOpen must be explicitly false: step-up must fail closed"
    assert provider.get("statusOnError") == "503", 'statusOnError must be the string "503"'
    assert "timeout" in provider, "set timeout explicitly: Istio's default is 600s"
    assert 0 < duration_seconds(provider["timeout"]) <= 1, "the Check timeout should stay well under a second"


def test_policy_selects_a_workload(policy_obj):
    labels = policy_obj["spec"].get("selector", {}).get("matchLabels", {})
    assert labels, "a CUSTOM policy without a selector applies to every workload of its namespace"


def test_policy_operations_use_known_fields(policy_obj):
    for rule in policy_obj["spec"]["rules"]:
        for to in rule.get("to", []):
            unknown = set(to.get("operation", {})) - OPERATION_FIELDS
            assert not unknown, f"Operation has no field(s) {sorted(unknown)}"


@pytest.mark.parametrize("path", SENSITIVE_PATHS + OTHER_PATHS)
def test_every_request_except_probes_goes_to_stepgate(policy_obj, path):
    assert sent_to_provider(policy_obj, path), f"{path} would bypass stepgate"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_probes_do_not_go_to_stepgate(policy_obj, path, method):
    assert not sent_to_provider(policy_obj, path, method), (
        f"{method} {path} goes to stepgate: with failOpen false a stepgate outage would fail the probes"
    )


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_probe_paths_by_other_methods_still_go_to_stepgate(policy_obj, path, method):
    assert sent_to_provider(policy_obj, path, method), (
        f"{method} {path} would bypass stepgate: only the kubelet's GET is kept away"
    )


# ---------------------------------------------------------------------------------------------
# mesh-config.yaml ⇄ stepgate-deployment.yaml


def test_provider_service_is_the_stepgate_service(provider, service, deployment):
    meta = service["metadata"]
    assert meta["namespace"] == deployment["metadata"]["namespace"]
    assert provider["service"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"


def test_provider_port_is_the_services_grpc_port(provider, service):
    grpc = service_port(service, "grpc")
    assert int(provider["port"]) == grpc["port"] == 50051  # Istio also accepts the port as a string
    assert grpc.get("appProtocol") == "grpc", "Istio needs to know the port speaks gRPC (HTTP/2)"


# ---------------------------------------------------------------------------------------------
# Inside stepgate-deployment.yaml


def test_service_targets_the_port_stepgate_listens_on(service, container):
    host, port = split_host_port(arg_value(container["args"], "--listen"))
    assert host in ("0.0.0.0", "::"), "stepgate must listen on all interfaces to be reachable from the sidecar"
    assert resolve_target_port(service_port(service, "grpc"), container) == port


def test_metrics_port_matches(service, container):
    _, port = split_host_port(arg_value(container["args"], "--metrics-listen"))
    assert resolve_target_port(service_port(service, "http-metrics"), container) == port


def test_readiness_probe_uses_grpc_health_on_the_listen_port(container):
    _, port = split_host_port(arg_value(container["args"], "--listen"))
    assert container["readinessProbe"]["grpc"]["port"] == port


def test_service_and_pdb_select_the_pods(manifest, deployment, service):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = only(manifest, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert deployment["spec"]["replicas"] >= 2
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "the PDB must allow a drain"


def test_grace_period_exceeds_drain_delay(deployment, container):
    drain = duration_seconds(arg_value(container["args"], "--drain-delay"))
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain


def mounted_policy(manifest: list[dict], deployment: dict, container: dict) -> str:
    """The policy text stepgate reads: the ConfigMap key mounted at the `--config` path."""
    config_path = Path(arg_value(container["args"], "--config"))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if Path(mount["mountPath"]) != config_path.parent:
            continue
        source = volumes[mount["name"]].get("configMap")
        assert source, f"{mount['mountPath']} is not mounted from a ConfigMap"
        cms = [
            d
            for d in manifest
            if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == source["name"]
        ]
        assert len(cms) == 1, f"ConfigMap {source['name']!r} is not in the manifest"
        assert cms[0]["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        data = cms[0].get("data", {})
        assert config_path.name in data, f"ConfigMap {source['name']!r} has no key {config_path.name!r}"
        return data[config_path.name]
    raise AssertionError(f"no volume is mounted at {config_path.parent} (the --config directory)")


def test_configmap_policy_is_yaml_with_issuers_and_rules(manifest, deployment, container):
    policy = yaml.safe_load(mounted_policy(manifest, deployment, container))
    assert isinstance(policy, dict)
    assert policy.get("issuers"), "the policy needs issuers"
    assert policy.get("rules"), "the policy needs rules"
    for issuer in policy["issuers"]:
        assert "jwks_file" not in issuer, "a jwks_file would have to be mounted too; use jwks_uri"
        assert "demo" not in issuer.get("issuer", ""), "never deploy the demo issuer"


def test_real_stepgate_check_accepts_the_policy(manifest, deployment, container, tmp_path):
    binary = os.environ.get("STEPGATE_BIN")
    if not binary:
        pytest.fail(
            "STEPGATE_BIN is not set: build stepgate (cargo build) and run with "
            "STEPGATE_BIN=target/debug/stepgate"
        )
    if not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"STEPGATE_BIN={binary} is not an executable file (run cargo build)")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(mounted_policy(manifest, deployment, container), encoding="utf-8")
    result = subprocess.run(
        [binary, "check", "--config", str(policy_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"stepgate check exited {result.returncode}:\n{result.stderr}{result.stdout}"
    )
    assert result.stdout.startswith("policy OK"), result.stdout


# ---------------------------------------------------------------------------------------------
# Kubernetes schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_with_kubernetes_validate(manifest, version):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: pip install kubernetes-validate "
            "(or pip install -r examples/istio/requirements.txt)"
        )
    if version == "latest":
        version = kubernetes_validate.latest_version()
    errors = []
    for doc in manifest:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, f"invalid against Kubernetes {version}:\n" + "\n".join(errors)


# ---------------------------------------------------------------------------------------------
# Who may call stepgate (stepgate-callers.yaml)


def test_stepgates_namespace_takes_mutual_tls_only(callers, deployment):
    peer = only(callers, "PeerAuthentication")
    assert peer["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert "selector" not in peer["spec"], "the whole namespace"


def test_only_named_namespaces_reach_check_and_decide(callers, deployment, service, container):
    policy = only(callers, "AuthorizationPolicy")
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert policy["spec"]["action"] == "ALLOW"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the policy selects stepgate's pods"
    _, grpc_port = split_host_port(arg_value(container["args"], "--listen"))
    _, metrics_port = split_host_port(arg_value(container["args"], "--metrics-listen"))
    reachable = set()
    for rule in policy["spec"]["rules"]:
        for to in rule["to"]:
            operation = to["operation"]
            assert not set(operation) - OPERATION_FIELDS, operation
            ports = {int(p) for p in operation["ports"]}
            assert ports <= {grpc_port, metrics_port}, ports
            if grpc_port in ports:
                # The gRPC port only from named namespaces, and only for the two RPCs.
                sources = [f["source"] for f in rule.get("from", [])]
                assert sources and all(s.get("namespaces") for s in sources), rule
                assert operation.get("paths"), "the gRPC port by RPC path"
                reachable.update(operation["paths"])
    assert reachable == {
        "/envoy.service.auth.v3.Authorization/Check",
        "/stepgate.v1.DecisionService/Decide",
    }


def test_the_protected_workloads_namespace_may_call_check(callers, policy_obj):
    policy = only(callers, "AuthorizationPolicy")
    check_sources = {
        namespace
        for rule in policy["spec"]["rules"]
        if any("/envoy.service.auth.v3.Authorization/Check" in t["operation"].get("paths", []) for t in rule["to"])
        for source in rule.get("from", [])
        for namespace in source["source"]["namespaces"]
    }
    assert policy_obj["metadata"]["namespace"] in check_sources, (
        "the sidecars authorization-policy.yaml sends to stepgate must be let in"
    )
