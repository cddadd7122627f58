"""Live tests of stepgate_client against the real stepgate binary and the demo policy.

The session fixtures start ``$STEPGATE_BIN serve`` on ephemeral ports (plaintext, TLS, mutual TLS)
and stop them at the end; tokens are minted with ``$STEPGATE_BIN token``, and the certificates of
the TLS and certificate-bound token tests are made with the ``openssl`` command into a temporary
folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import stepgate_client as sg

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "examples" / "stepgate.yaml"
START_DEADLINE_SECONDS = 15

WIRE = "payments.wire_transfer"
C1_CLAIMS = {"access_token": {"acrs": {"essential": True, "value": "c1"}}}
C1_CLAIMS_B64 = "eyJhY2Nlc3NfdG9rZW4iOnsiYWNycyI6eyJlc3NlbnRpYWwiOnRydWUsInZhbHVlIjoiYzEifX19"
#: The client identity of the mutual TLS tests, and the one stepgate is told to accept.
CLIENT_SPIFFE_ID = "spiffe://cluster.local/ns/payments/sa/api"
#: A client identity of the same CA that stepgate is not told to accept.
OTHER_SPIFFE_ID = "spiffe://cluster.local/ns/default/sa/web"
ENTRA_CHALLENGE_PREFIX = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
    'error="insufficient_claims", claims="'
)


@pytest.fixture(scope="session")
def stepgate_bin() -> str:
    path = os.environ.get("STEPGATE_BIN")
    hint = "build it with `cargo build` and set STEPGATE_BIN=target/debug/stepgate, or run ./scripts/test"
    if not path:
        pytest.fail(f"STEPGATE_BIN is not set: {hint}", pytrace=False)
    path = str(Path(path).resolve())
    if not os.access(path, os.X_OK):
        pytest.fail(f"STEPGATE_BIN={path} is not an executable file: {hint}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def channel(stepgate_bin):
    """A plaintext channel to a stepgate started for this test session, SERVING before the first test."""
    with _serve(stepgate_bin) as (_, ch):
        yield ch


@contextlib.contextmanager
def _serve(stepgate_bin: str, *args: str, connect=sg.connect, config: Path = CONFIG):
    """Runs ``stepgate serve`` on ``config`` (the demo policy) with ``args``; yields its address and a
    channel made by ``connect(address)`` once that channel reports SERVING; stops the server at the end."""
    proc = subprocess.Popen(
        [stepgate_bin, "serve", "--config", str(config), "--listen", "127.0.0.1:0", "--log-format", "json", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # stepgate logs every decision to stderr: keep draining it, or a full pipe would block it.
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def drain():
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    ch = None
    try:
        address = _listening_address(lines, log)
        ch = connect(address)
        _wait_serving(ch, log)
        yield address, ch
    finally:
        if ch is not None:
            ch.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening_address(lines: queue.Queue, log: list[str]) -> str:
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            pytest.fail("stepgate exited before listening:\n" + "".join(log), pytrace=False)
        try:
            message = json.loads(line).get("message", "")
        except ValueError:
            continue
        if match := re.search(r"stepgate listening on (\S+)", message):
            return match.group(1)
    pytest.fail("stepgate did not log `stepgate listening on` in time:\n" + "".join(log), pytrace=False)


def _wait_serving(ch: grpc.Channel, log: list[str]) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    request = health_pb2.HealthCheckRequest(service="stepgate.v1.DecisionService")
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        try:
            if health.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    pytest.fail("stepgate did not report SERVING in time:\n" + "".join(log), pytrace=False)


@pytest.fixture(scope="session")
def mint(stepgate_bin):
    """mint("--acrs", "c1", ...) -> a demo token from `stepgate token`."""

    def mint(*args: str) -> str:
        done = subprocess.run([stepgate_bin, "token", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"stepgate token {' '.join(args)} failed: {done.stderr}"
        return done.stdout.strip()

    return mint


# --- TLS fixtures ---------------------------------------------------------------------------------

#: The openssl configuration of the test certificates: a CA, stepgate's certificate (valid for
#: localhost and 127.0.0.1) and client certificates naming CLIENT_SPIFFE_ID and OTHER_SPIFFE_ID.
OPENSSL_CNF = f"""
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = URI:{CLIENT_SPIFFE_ID}
authorityKeyIdentifier = keyid
[other]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = URI:{OTHER_SPIFFE_ID}
authorityKeyIdentifier = keyid
"""


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, stepgate's certificate and two client certificates (PEM files, EC P-256), by name."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the TLS tests make their certificates with the `openssl` command: install OpenSSL", pytrace=False)
    out = tmp_path_factory.mktemp("pki")
    (out / "openssl.cnf").write_text(OPENSSL_CNF)

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=out, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"openssl {' '.join(args)} failed: {done.stderr}"

    def key(name: str) -> None:
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")

    key("ca")
    run("req", "-new", "-x509", "-key", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=stepgate test CA",
        "-config", "openssl.cnf", "-extensions", "ca")
    for name, cn in (("server", "localhost"), ("client", "payments-api"), ("other", "web")):
        key(name)
        run("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", "-config", "openssl.cnf")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
            str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-out", f"{name}.crt",
            "-extfile", "openssl.cnf", "-extensions", name)
    return {path.name: path for path in out.iterdir() if path.suffix in (".crt", ".key")}


@pytest.fixture(scope="session")
def tls_address(stepgate_bin, pki) -> str:
    """The address of a stepgate serving TLS (no client certificate asked for)."""
    args = ("--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]))
    with _serve(stepgate_bin, *args, connect=lambda address: sg.connect(address, ca_file=pki["ca.crt"])) as (address, _):
        yield address


@pytest.fixture(scope="session")
def mtls_address(stepgate_bin, pki) -> str:
    """The address of a stepgate requiring a client certificate of the test CA naming CLIENT_SPIFFE_ID."""
    args = (
        "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]),
        "--client-ca", str(pki["ca.crt"]), "--client-san", CLIENT_SPIFFE_ID,
    )

    def connect(address: str) -> grpc.Channel:
        return sg.connect(address, ca_file=pki["ca.crt"], cert_file=pki["client.crt"], key_file=pki["client.key"])

    with _serve(stepgate_bin, *args, connect=connect) as (address, _):
        yield address


# --- Decide ---------------------------------------------------------------------------------------


def test_allow_wire_transfer_with_c1(channel, mint):
    token = mint("--acrs", "c1", "--xms-cc", "cp1")
    r = sg.decide(channel, authorization=f"Bearer {token}", operation=WIRE)
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.ALLOW, "wire-transfer", "allowed", 200)
    assert r.www_authenticate == ""
    assert dict(r.identity_headers) == {
        "x-stepgate-subject": "alice",
        "x-stepgate-tenant": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "x-stepgate-auth-contexts": "c1",
        "x-stepgate-rule": "wire-transfer",
    }
    assert (r.principal.issuer_id, r.principal.subject, list(r.principal.acrs)) == ("demo-entra", "alice", ["c1"])
    assert not r.HasField("step_up")
    assert re.fullmatch(r"[0-9a-f]{12}", r.token_fingerprint)


def test_step_up_entra_claims_challenge(channel, mint):
    token = mint("--xms-cc", "cp1")
    r = sg.decide(channel, token=token, operation=WIRE)
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.STEP_UP, "wire-transfer", "missing_auth_context", 401)
    assert r.www_authenticate == ENTRA_CHALLENGE_PREFIX + C1_CLAIMS_B64 + '"'
    assert json.loads(r.step_up.claims) == C1_CLAIMS
    assert base64.b64decode(r.step_up.claims_base64).decode() == r.step_up.claims
    assert r.step_up.challenge_style == "entra"
    assert list(r.step_up.auth_contexts) == ["c1"]
    assert list(r.step_up.missing_auth_contexts) == ["c1"]
    assert r.step_up.max_age_seconds == 900
    assert dict(r.identity_headers) == {}


def test_deny_without_token(channel):
    r = sg.decide(channel, operation=WIRE)
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.DENY, "", "token_missing", 401)
    assert r.www_authenticate == 'Bearer realm="stepgate-demo"'
    assert not r.HasField("principal")
    assert not r.HasField("step_up")
    assert r.token_fingerprint == ""


def test_deny_client_not_capable(channel, mint):
    token = mint()  # no xms_cc: the client cannot handle a claims challenge
    r = sg.decide(channel, token=token, operation=WIRE)
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.DENY, "wire-transfer", "client_not_capable", 403)
    assert r.www_authenticate == ""
    assert list(r.step_up.missing_auth_contexts) == ["c1"]  # what is missing, for the service to explain
    assert r.principal.subject == "alice"


def test_rfc9470_step_up_on_admin_route(channel, mint):
    token = mint("--issuer", "oidc", "--roles", "Admin")  # password only, no acr
    r = sg.decide(channel, method="GET", path="/admin/users", headers={"authorization": f"Bearer {token}"})
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.STEP_UP, "admin", "acr_not_accepted", 401)
    assert r.www_authenticate == (
        'Bearer realm="stepgate-demo", error="insufficient_user_authentication", '
        'error_description="authentication level urn:okta:loa:2fa:any or phr is required", '
        'acr_values="urn:okta:loa:2fa:any phr", max_age=3600'
    )
    assert r.step_up.challenge_style == "rfc9470"
    assert list(r.step_up.acr_values) == ["urn:okta:loa:2fa:any", "phr"]
    assert r.step_up.max_age_seconds == 3600
    assert list(r.step_up.amr) == ["mfa"]
    assert (r.step_up.claims, r.step_up.claims_base64) == ("", "")


def test_rfc9470_allow_after_step_up(channel, mint):
    token = mint("--issuer", "oidc", "--roles", "Admin", "--acr", "urn:okta:loa:2fa:any", "--amr", "pwd,mfa")
    r = sg.decide(channel, authorization=f"Bearer {token}", method="GET", path="/admin/users")
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.ALLOW, "admin", "allowed", 200)
    assert r.principal.issuer_id == "demo-oidc"
    assert r.identity_headers["x-stepgate-rule"] == "admin"


@pytest.mark.parametrize(
    ("amount", "outcome", "missing"),
    [(5000, sg.ALLOW, []), (25000, sg.STEP_UP, ["c2"])],
)
def test_risk_escalation_by_amount(channel, mint, amount, outcome, missing):
    token = mint("--acrs", "c1", "--xms-cc", "cp1")
    r = sg.decide(channel, token=token, operation=WIRE, attributes={"amount": amount, "currency": "EUR"})
    assert (r.outcome, r.rule) == (outcome, "wire-transfer")
    assert list(r.step_up.missing_auth_contexts) == missing
    if outcome == sg.STEP_UP:
        assert list(r.step_up.auth_contexts) == ["c1", "c2"]
        assert json.loads(r.step_up.claims) == {"access_token": {"acrs": {"essential": True, "value": "c2"}}}
        assert r.www_authenticate.endswith(f'claims="{r.step_up.claims_base64}"')


def test_unusable_request_is_a_400_denial_not_a_grpc_error(channel):
    r = sg.decide(channel)  # neither operation nor http: nothing to match a rule against
    assert (r.outcome, r.http_status, r.reason) == (sg.DENY, 400, "malformed_request")
    assert "set operation, http, or both" in r.message


def test_an_http_request_without_a_method_is_refused(channel):
    # The client refuses to send it...
    with pytest.raises(ValueError, match="method"):
        sg.decide(channel, path="/healthz")
    # ... and stepgate refuses it: a method only in `:method` is that method, not a default GET.
    request = sg.DecideRequest()
    request.http.path = "/healthz"
    r = sg.decision_pb2_grpc.DecisionServiceStub(channel).Decide(request, timeout=5)
    assert (r.outcome, r.http_status, r.reason) == (sg.DENY, 400, "malformed_request")
    assert "without a method" in r.message
    request.http.headers[":method"] = "POST"
    r = sg.decision_pb2_grpc.DecisionServiceStub(channel).Decide(request, timeout=5)
    assert r.outcome != sg.ALLOW, "POST /healthz is not the anonymous GET health route"
    request.http.headers[":method"] = "GET"
    r = sg.decision_pb2_grpc.DecisionServiceStub(channel).Decide(request, timeout=5)
    assert (r.outcome, r.rule) == (sg.ALLOW, "health")


# --- to_http_reply / authorize ----------------------------------------------------------------------


def test_reply_allow_forwards_identity_headers(channel, mint):
    reply = sg.authorize(channel, authorization=f"Bearer {mint('--acrs', 'c1', '--xms-cc', 'cp1')}", operation=WIRE)
    assert reply.status == 200
    assert reply.body is None
    assert reply.headers["x-stepgate-subject"] == "alice"
    assert reply.headers["x-stepgate-auth-contexts"] == "c1"
    assert "www-authenticate" not in reply.headers


def test_upstream_headers_drop_every_spelling_a_client_could_speak_for_stepgate_with(channel, mint):
    reply = sg.authorize(channel, authorization=f"Bearer {mint('--acrs', 'c1', '--xms-cc', 'cp1')}", operation=WIRE)
    client = {
        "Authorization": "Bearer client-token",
        "Accept": "application/json",
        "X-Stepgate-Subject": "admin",
        # WSGI, Rack and PHP read these as the hyphenated names (HTTP_X_STEPGATE_...).
        "x_stepgate_subject": "admin",
        "X_STEPGATE_AUTH_CONTEXTS": "c1 c2 c3",
        "x-stepgate-acr": "urn:spoofed",
    }
    upstream = sg.upstream_headers(client, reply)
    assert upstream == {
        "Authorization": "Bearer client-token",  # the demo policy keeps it (remove_authorization: false)
        "Accept": "application/json",
        **reply.headers,
    }
    assert upstream["x-stepgate-subject"] == "alice"
    with pytest.raises(ValueError):
        sg.upstream_headers(client, sg.fail_closed())


def test_upstream_headers_drop_what_stepgate_asks_to_remove(stepgate_bin, mint, tmp_path):
    """A custom identity header stepgate leaves unset, and ``authorization`` under
    ``remove_authorization: true``, arrive in ``headers_to_remove``: the reply carries them and
    ``upstream_headers`` drops the client's, whatever their spelling."""
    text = CONFIG.read_text().replace("demo-keys/", f"{CONFIG.parent / 'demo-keys'}/")
    text = text.replace(
        "    x-stepgate-rule: rule\n  remove_authorization: false",
        "    x-stepgate-rule: rule\n    x-tenant-name: claim:tenant_name\n  remove_authorization: true",
    )
    assert "x-tenant-name" in text and "remove_authorization: true" in text
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    with _serve(stepgate_bin, config=policy) as (_, ch):
        token = mint("--acrs", "c1", "--xms-cc", "cp1")
        reply = sg.authorize(ch, authorization=f"Bearer {token}", operation=WIRE)
    assert reply.status == 200
    assert {"x-tenant-name", "authorization"} <= set(reply.remove), reply.remove
    upstream = sg.upstream_headers(
        {"Authorization": f"Bearer {token}", "X_Tenant_Name": "victim-tenant", "Accept": "*/*"}, reply
    )
    assert upstream == {"Accept": "*/*", **reply.headers}, upstream


def test_reply_step_up_is_401_with_challenge(channel, mint):
    reply = sg.authorize(channel, token=mint("--xms-cc", "cp1"), operation=WIRE)
    assert reply.status == 401
    assert reply.headers == {
        "content-type": "application/json",
        "www-authenticate": ENTRA_CHALLENGE_PREFIX + C1_CLAIMS_B64 + '"',
    }
    assert json.loads(reply.body) == {
        "error": "insufficient_claims",
        "reason": "missing_auth_context",
        "rule": "wire-transfer",
        "message": "authentication context c1 is required",
    }


def test_reply_deny_token_missing_is_bare_401(channel):
    reply = sg.authorize(channel, operation=WIRE)
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="stepgate-demo"'
    body = json.loads(reply.body)
    assert (body["error"], body["reason"], body["rule"]) == ("unauthorized", "token_missing", None)


def test_reply_deny_client_not_capable_is_403_without_challenge(channel, mint):
    reply = sg.authorize(channel, token=mint(), operation=WIRE)
    assert reply.status == 403
    assert reply.headers == {"content-type": "application/json"}
    body = json.loads(reply.body)
    assert (body["error"], body["reason"], body["rule"]) == ("access_denied", "client_not_capable", "wire-transfer")


def test_reply_rfc9470_step_up(channel, mint):
    reply = sg.authorize(channel, token=mint("--issuer", "oidc", "--roles", "Admin"), method="DELETE", path="/admin/users/7")
    assert reply.status == 401
    assert 'acr_values="urn:okta:loa:2fa:any phr", max_age=3600' in reply.headers["www-authenticate"]
    assert json.loads(reply.body)["error"] == "insufficient_user_authentication"


def test_reply_to_an_unusable_request_is_400(channel):
    reply = sg.authorize(channel)  # neither operation nor http
    assert reply.status == 400
    assert json.loads(reply.body)["reason"] == "malformed_request"
    assert "x-stepgate-subject" not in reply.headers


def test_reply_fails_closed_when_stepgate_is_unreachable():
    with grpc.insecure_channel("127.0.0.1:1") as dead:  # nothing listens on port 1
        reply = sg.authorize(dead, operation=WIRE, timeout=2)
    assert reply.status == 503


def test_authorize_fails_closed_on_a_request_decide_refuses_to_send(channel):
    # decide raises for these; authorize answers 503 rather than raising into the service.
    with pytest.raises(ValueError):
        sg.decide(channel, path="/payments/wire")
    assert sg.authorize(channel, path="/payments/wire").status == 503
    assert sg.authorize(channel, authorization="Bearer a", token="b", operation=WIRE).status == 503
    assert sg.authorize(channel, operation=WIRE, no_such_field=1).status == 503
    assert sg.authorize(channel, operation=WIRE, attributes={"a": 10**400}).status == 503
    nested: dict = {}
    for _ in range(5000):
        nested = {"n": nested}
    assert sg.authorize(channel, operation=WIRE, attributes=nested).status == 503


def test_reply_fails_closed_on_unknown_outcome():
    assert sg.to_http_reply(sg.DecideResponse()).status == 503  # OUTCOME_UNSPECIFIED
    assert sg.to_http_reply(None).status == 503


# --- TLS and mutual TLS ---------------------------------------------------------------------------


def test_decide_over_tls(tls_address, pki, mint):
    with sg.connect(tls_address, ca_file=pki["ca.crt"]) as ch:
        r = sg.decide(ch, token=mint("--acrs", "c1", "--xms-cc", "cp1"), operation=WIRE)
        assert (r.outcome, r.rule, r.http_status) == (sg.ALLOW, "wire-transfer", 200)
        assert sg.authorize(ch, operation=WIRE).status == 401  # stepgate's answer, not a failure


def test_tls_checks_the_server_name(tls_address, pki, mint):
    # The certificate names localhost and 127.0.0.1: another name for the same address is refused,
    # and server_name says which name to check when the target does not carry it.
    port = tls_address.rsplit(":", 1)[1]
    with sg.connect(tls_address, ca_file=pki["ca.crt"], server_name="stepgate.example.com") as ch:
        with pytest.raises(grpc.RpcError) as error:
            sg.decide(ch, operation=WIRE, timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with sg.connect(f"127.0.0.1:{port}", ca_file=pki["ca.crt"], server_name="localhost") as ch:
        assert sg.decide(ch, token=mint(), operation="accounts.read").outcome == sg.ALLOW


def test_plaintext_client_against_tls_fails_closed(tls_address):
    with sg.connect(tls_address) as ch:
        assert sg.authorize(ch, operation=WIRE, timeout=5).status == 503


def test_decide_over_mutual_tls(mtls_address, pki, mint):
    with sg.connect(mtls_address, ca_file=pki["ca.crt"], cert_file=pki["client.crt"], key_file=pki["client.key"]) as ch:
        r = sg.decide(ch, token=mint("--acrs", "c1", "--xms-cc", "cp1"), operation=WIRE)
        assert (r.outcome, r.rule, r.http_status) == (sg.ALLOW, "wire-transfer", 200)


def test_mutual_tls_without_a_client_certificate_fails_closed(mtls_address, pki):
    with sg.connect(mtls_address, ca_file=pki["ca.crt"]) as ch:
        with pytest.raises(grpc.RpcError) as error:
            sg.decide(ch, operation=WIRE, timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sg.authorize(ch, operation=WIRE, timeout=5).status == 503


def test_mutual_tls_refuses_a_client_certificate_not_on_client_san(mtls_address, pki):
    # Of the right CA, but naming OTHER_SPIFFE_ID, which --client-san does not list.
    with sg.connect(mtls_address, ca_file=pki["ca.crt"], cert_file=pki["other.crt"], key_file=pki["other.key"]) as ch:
        with pytest.raises(grpc.RpcError) as error:
            sg.decide(ch, operation=WIRE, timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sg.authorize(ch, operation=WIRE, timeout=5).status == 503


def test_connect_refuses_half_a_client_identity(pki):
    with pytest.raises(ValueError, match="together"):
        sg.connect("127.0.0.1:1", ca_file=pki["ca.crt"], cert_file=pki["client.crt"])
    with pytest.raises(ValueError, match="TLS only"):
        sg.connect("127.0.0.1:1", server_name="localhost")


# --- Certificate-bound tokens (RFC 8705) ----------------------------------------------------------
# The end client's certificate, as the service's own TLS stack hands it over: DER bytes. The test
# CA's client certificates stand in for it (stepgate hashes it; it does not verify who issued it).


def _der(pem_file: Path) -> bytes:
    """A PEM certificate file as the DER ``getpeercert(binary_form=True)`` returns."""
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())


#: An operation of the demo policy's ``everything-else`` rule: any valid token.
READ = "accounts.read"
#: The start of the challenge of a token refused for its certificate binding.
INVALID_TOKEN_CHALLENGE_PREFIX = 'Bearer realm="stepgate-demo", error="invalid_token", error_description="'


@pytest.fixture
def bound_token(mint, pki) -> str:
    """A demo token whose ``cnf`` holds the ``x5t#S256`` of ``client.crt``."""
    return mint("--bound-to", str(pki["client.crt"]))


def test_certificate_bound_token_is_allowed_with_its_certificate(channel, bound_token, pki):
    der = _der(pki["client.crt"])
    r = sg.decide(channel, token=bound_token, operation=READ, client_certificate=der)
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.ALLOW, "everything-else", "allowed", 200)
    reply = sg.authorize(channel, authorization=f"Bearer {bound_token}", operation=READ, client_certificate=der)
    assert (reply.status, reply.headers["x-stepgate-subject"]) == (200, "alice")


def test_certificate_bound_token_with_another_certificate_is_an_invalid_token(channel, bound_token, pki):
    other = _der(pki["other.crt"])
    reply = sg.authorize(channel, authorization=f"Bearer {bound_token}", operation=READ, client_certificate=other)
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith(INVALID_TOKEN_CHALLENGE_PREFIX), reply.headers
    body = json.loads(reply.body)
    assert (body["error"], body["reason"], body["rule"]) == ("invalid_token", "client_certificate_mismatch", None)


def test_certificate_bound_token_without_a_certificate_is_an_invalid_token(channel, bound_token):
    reply = sg.authorize(channel, authorization=f"Bearer {bound_token}", operation=READ)
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith(INVALID_TOKEN_CHALLENGE_PREFIX), reply.headers
    body = json.loads(reply.body)
    assert (body["error"], body["reason"], body["rule"]) == ("invalid_token", "client_certificate_missing", None)


def test_bearer_token_ignores_a_client_certificate(channel, mint, pki):
    r = sg.decide(channel, token=mint(), operation=READ, client_certificate=_der(pki["other.crt"]))
    assert (r.outcome, r.rule, r.reason, r.http_status) == (sg.ALLOW, "everything-else", "allowed", 200)


def test_client_certificate_must_be_der_bytes(channel, bound_token, pki):
    # PEM text is not what stepgate hashes: the client refuses it, and authorize fails closed.
    pem = pki["client.crt"].read_text()
    with pytest.raises(TypeError):
        sg.decide(channel, token=bound_token, operation=READ, client_certificate=pem)
    assert sg.authorize(channel, token=bound_token, operation=READ, client_certificate=pem).status == 503
