"""A minimal Python caller of stepgate's ``stepgate.v1.DecisionService/Decide`` RPC.

A Python web service that is *not* behind Envoy asks stepgate, for each request it serves, whether
that request may go ahead with the authentication its access token carries, and answers the way
stepgate says::

    channel = connect("127.0.0.1:50051")                    # one channel for the whole process

    def handle(method, path, headers):
        reply = authorize(channel, authorization=headers.get("authorization"),
                          operation="payments.wire_transfer", attributes={"amount": 25000})
        if reply.status != 200:
            return reply                                      # 401 / 403 / 400 / 503, as is
        return call_upstream(method, path, upstream_headers(headers, reply))

Over TLS (stepgate ``--tls-cert``), verify stepgate against your CA; for mutual TLS (stepgate
``--client-ca``), present a client certificate as well::

    channel = connect("stepgate.stepgate.svc:50051", ca_file="/etc/stepgate-ca/ca.crt",
                      cert_file="/etc/tls/tls.crt", key_file="/etc/tls/tls.key")

The stubs are generated from ``proto/`` of this repository when this module is first imported (into
a temporary folder), so no generated code is committed and the client can never drift from the
proto it is shipped with. A real service would generate them at build time instead.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import import_module, resources
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import grpc
from grpc_tools import protoc

#: ``proto/`` of the stepgate checkout this file lives in; override with ``STEPGATE_PROTO_DIR``.
PROTO_DIR = Path(os.environ.get("STEPGATE_PROTO_DIR") or Path(__file__).resolve().parents[3] / "proto")
PROTO_FILE = "stepgate/v1/decision.proto"

#: Authorization sits in the request path: a slow stepgate must not hang the service. On expiry the
#: call fails with DEADLINE_EXCEEDED and the request is refused (fail closed).
DEFAULT_TIMEOUT_SECONDS = 2.0


def _generate_stubs() -> tuple[Any, Any]:
    """Runs protoc (bundled with grpcio-tools) on ``decision.proto`` and imports the result.

    The output goes to a private temporary folder, put first on ``sys.path`` because the generated
    ``decision_pb2_grpc`` imports ``stepgate.v1.decision_pb2`` by its package path. The folder is
    removed when the interpreter exits.
    """
    out = Path(tempfile.mkdtemp(prefix="stepgate-stubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/struct.proto
    status = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        PROTO_FILE,
    ])
    if status != 0:
        raise ImportError(f"protoc failed ({status}) on {PROTO_DIR / PROTO_FILE}")
    sys.path.insert(0, str(out))
    return import_module("stepgate.v1.decision_pb2"), import_module("stepgate.v1.decision_pb2_grpc")


decision_pb2, decision_pb2_grpc = _generate_stubs()
DecideRequest = decision_pb2.DecideRequest
DecideResponse = decision_pb2.DecideResponse
ALLOW, STEP_UP, DENY = decision_pb2.OUTCOME_ALLOW, decision_pb2.OUTCOME_STEP_UP, decision_pb2.OUTCOME_DENY


def connect(
    target: str,
    *,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    server_name: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to stepgate at ``target`` (``host:port``). Make one and share it: it reconnects
    by itself, and every call multiplexes over its connection.

    - Neither ``ca_file`` nor ``cert_file``: plaintext, for a stepgate on loopback or behind a mesh
      that encrypts for it.
    - ``ca_file``: TLS, stepgate's certificate verified against the CAs of that PEM bundle (the CA
      that issued stepgate's ``--tls-cert``).
    - ``cert_file`` and ``key_file`` as well: mutual TLS, presenting that client certificate (PEM
      chain and key) to a stepgate started with ``--client-ca``. With ``--client-san``, the
      certificate must name one of the listed subject alternative names. Without ``ca_file``,
      stepgate is verified against gRPC's default roots.
    - ``server_name``: the name stepgate's certificate is checked for when ``target`` does not carry
      it (an IP address, a load balancer's name); TLS only.

    The files are read once. When your client certificate is rotated, make a new channel (stepgate
    reloads its own files by itself: open channels keep working, new connections get the new
    certificate). A refused handshake (no or wrong client certificate, an untrusted server) is not
    an answer: the call raises ``grpc.RpcError`` (UNAVAILABLE), and ``authorize`` fails closed.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("pass cert_file and key_file together (the client certificate and its key)")
    if ca_file is None and cert_file is None:
        if server_name is not None:
            raise ValueError("server_name applies to TLS only: pass ca_file (or cert_file and key_file)")
        return grpc.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )
    options = list(options)
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def decide(
    channel: grpc.Channel,
    *,
    authorization: str | None = None,
    token: str | None = None,
    operation: str = "",
    method: str | None = None,
    path: str | None = None,
    host: str | None = None,
    headers: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    client_certificate: bytes | None = None,
    explain: bool = False,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> DecideResponse:
    """Asks stepgate for a decision and returns the ``DecideResponse`` as is.

    Pass the client's ``Authorization`` header value untouched as ``authorization`` rather than
    extracting the token yourself: stepgate then also catches a wrong scheme or two credentials
    (``400 invalid_request``). Use ``token`` only when you hold a bare token.

    ``operation`` names what is being attempted (``payments.wire_transfer``) for rules with an
    ``operation`` matcher; ``method``/``path``/``host``/``headers`` describe the HTTP request so
    route rules apply (``method`` is required with them). At least one of the two is required.
    ``attributes`` is a plain dict sent
    as a ``google.protobuf.Struct`` for the policy's conditions (numbers arrive as doubles).

    ``client_certificate`` is the DER of the certificate the *end client* authenticated its TLS
    connection to this service with (the leaf alone; not the certificate of this service's own
    channel to stepgate). A token bound to a certificate (``cnf`` holding ``x5t#S256``, RFC 8705)
    is good only with it: without it the answer is ``401 client_certificate_missing``, with another
    certificate ``401 client_certificate_mismatch``, both with an ``error="invalid_token"``
    challenge. stepgate reads it for bound tokens only, so pass it whenever you have it. Where it
    comes from:

    - A Python server terminating TLS itself, asking for client certificates (``verify_mode``
      ``CERT_OPTIONAL`` or ``CERT_REQUIRED`` on its ``ssl.SSLContext``):
      ``ssl_object.getpeercert(binary_form=True)`` -- ``conn.getpeercert(binary_form=True)`` on an
      ``ssl.SSLSocket``, ``transport.get_extra_info("ssl_object").getpeercert(binary_form=True)``
      under asyncio. It is None when the client sent no certificate, which is what to pass then.
    - A WSGI/ASGI app behind a proxy (nginx, Envoy, a load balancer) that terminates TLS: the
      app's own connection is to the proxy, so the certificate must come from the proxy, which
      must forward it in a header it overwrites on every request (nginx
      ``$ssl_client_escaped_cert``, Envoy's ``x-forwarded-client-cert`` ``Cert=``: URL-encoded PEM,
      so ``ssl.PEM_cert_to_DER_cert(urllib.parse.unquote(value))``). Never read such a header a
      client could set itself.

    Every request is answered with an OK gRPC status: read ``outcome``. That holds for DENY, for a
    request stepgate cannot decide on (``400 malformed_request``: neither operation nor http) and
    for a failure inside stepgate (``500 internal_error``). A gRPC error (``grpc.RpcError``) means
    stepgate could not answer at all (UNAVAILABLE, DEADLINE_EXCEEDED, ...); it is raised, and the
    caller must treat it as "not allowed" -- ``authorize`` does.
    """
    if authorization is not None and token is not None:
        raise ValueError("pass authorization or token, not both (they are one oneof)")
    if not method and (path is not None or host is not None or headers):
        # stepgate refuses an HTTP request without a method (400 malformed_request).
        raise ValueError("pass the HTTP request's method with its path, host or headers")
    request = DecideRequest(operation=operation, explain=explain)
    if authorization is not None:
        request.authorization = authorization
    if token is not None:
        request.token = token
    # `http` is a message: merely present (even empty) it is validated, so set it only when used.
    if method is not None or path is not None or host is not None or headers:
        request.http.method = method
        request.http.path = path or ""
        request.http.host = host or ""
        request.http.headers.update(headers or {})
    if attributes:
        request.attributes.update(attributes)
    if client_certificate is not None:
        request.client_certificate = client_certificate  # TypeError unless bytes (DER, not PEM text)
    return decision_pb2_grpc.DecisionServiceStub(channel).Decide(request, timeout=timeout)


class HttpReply(NamedTuple):
    """What the web service does with a decision.

    ``status == 200``: the request proceeds; ``headers`` are the identity headers to *add to the
    upstream request* (the verified subject, auth contexts, ...), ``remove`` the headers the
    client sent that must not reach it (``headers_to_remove``: identity headers stepgate left
    unset, ``authorization`` when the policy says so), and ``body`` is None; ``upstream_headers``
    applies both. Otherwise: answer the client with ``status``, the response ``headers`` and the
    JSON ``body``.
    """

    status: int
    headers: dict[str, str]
    body: bytes | None
    remove: tuple[str, ...] = ()


#: The prefix of stepgate's identity headers: a client's own never reach the upstream.
IDENTITY_PREFIX = "x-stepgate-"


def _header_key(name: str) -> str:
    """A header name as servers that read ``_`` as ``-`` read it (WSGI, Rack, PHP, CGI:
    ``x_stepgate_subject`` and ``x-stepgate-subject`` are both ``HTTP_X_STEPGATE_SUBJECT``)."""
    return name.lower().replace("_", "-")


def upstream_headers(client_headers: Mapping[str, str], reply: HttpReply) -> dict[str, str]:
    """The headers to send upstream for an ALLOW: the client's, without any it could use to
    speak for stepgate -- every ``x-stepgate-*``, every name stepgate sets or asks to remove
    (``reply.remove``), each in any case and with ``_`` for ``-`` -- and then stepgate's
    identity headers. Raises ``ValueError`` for a reply that is not an ALLOW."""
    if reply.status != 200:
        raise ValueError("upstream headers are for an ALLOW (status 200) only")
    dropped = {_header_key(name) for name in (*reply.headers, *reply.remove)}
    upstream = {
        name: value
        for name, value in client_headers.items()
        if not (_header_key(name).startswith(IDENTITY_PREFIX) or _header_key(name) in dropped)
    }
    upstream.update(reply.headers)
    return upstream


def fail_closed() -> HttpReply:
    """The reply when stepgate could not be asked, or refused the question: the request must not go
    ahead, and the client learns nothing about the policy or the error. 503: the fault is ours."""
    body = {"error": "temporarily_unavailable", "reason": "authorization_unavailable"}
    return HttpReply(503, {"content-type": "application/json"}, json.dumps(body).encode())


def to_http_reply(response: DecideResponse | grpc.RpcError) -> HttpReply:
    """Maps a Decide answer (or the gRPC error raised instead of one) to the service's HTTP reply.

    ALLOW: 200, ``identity_headers`` for the upstream and ``headers_to_remove`` as ``remove``.
    Before adding them the service must drop the headers of the same family the *client* sent:
    stepgate sets only the headers it has values for, so a configured header it leaves unset (no
    ``tid`` in the token, say) would otherwise reach the upstream with the client's value, and a
    client's ``x_stepgate_subject`` is ``x-stepgate-subject`` to a WSGI, Rack or PHP upstream.
    ``upstream_headers`` does both.

    STEP_UP / DENY: ``http_status`` as is, and ``WWW-Authenticate`` when stepgate gives one -- it is
    the challenge (Entra claims challenge or RFC 9470) the client's identity library acts on, so it
    must be passed through byte for byte. The body mirrors the one stepgate's Envoy door sends:
    ``{"error", "reason", "rule", "message"}``.

    Anything else -- a gRPC error, or an outcome this client does not know -- fails closed (503).
    """
    if isinstance(response, grpc.RpcError) or not isinstance(response, DecideResponse):
        return fail_closed()
    if response.outcome == ALLOW:
        return HttpReply(
            200, dict(response.identity_headers), None, tuple(response.headers_to_remove)
        )
    if response.outcome not in (STEP_UP, DENY):
        return fail_closed()
    headers = {"content-type": "application/json"}
    if response.www_authenticate:
        headers["www-authenticate"] = response.www_authenticate
    body = {
        "error": _oauth_error(response),
        "reason": response.reason,
        "rule": response.rule or None,
        "message": response.message,
    }
    return HttpReply(response.http_status or 403, headers, json.dumps(body).encode())


def authorize(channel: grpc.Channel, **request: Any) -> HttpReply:
    """``decide`` + ``to_http_reply`` in one call, with ``decide``'s keywords -- among them
    ``client_certificate``, the DER of the end client's TLS certificate
    (``ssl_object.getpeercert(binary_form=True)``; see ``decide``) for certificate-bound tokens.
    Never raises: a gRPC error, a request ``decide`` refuses to send (a path without its method,
    both a token and an Authorization header) and one protobuf cannot hold (a number past a
    double, attributes nested past Python's recursion limit, a certificate that is not bytes) all
    fail closed (503), as in the Node client."""
    try:
        return to_http_reply(decide(channel, **request))
    except Exception:  # noqa: BLE001 - an authorizer that cannot ask answers "not allowed"
        return fail_closed()


def _oauth_error(response: DecideResponse) -> str:
    """The challenge's OAuth ``error`` code, or a generic one when there is no challenge."""
    match = re.search(r'\berror="([^"]*)"', response.www_authenticate)
    if match:
        return match.group(1)
    if response.outcome == STEP_UP:
        return "insufficient_user_authentication"
    return "unauthorized" if response.http_status == 401 else "access_denied"
