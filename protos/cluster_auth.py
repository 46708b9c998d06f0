"""The cluster credential on the wire: who may call a worker, and how every channel proves it.

Shared by the router and the workers (both import `protos`; the router never imports
`services`). Owns:
- `ClusterCredentials`: the cluster secret (`--cluster-secret-file`) and the optional TLS
  files (`--tls-cert-file`, `--tls-key-file`, `--tls-ca-file`), loaded once at start.
  With no secret and no TLS the cluster is open, as before (`enabled` is False).
- `open_channel(address, credentials, options)`: THE way to open a gRPC channel to a
  worker (router, decode -> prefill, simulators): TLS when configured, and a client
  interceptor that puts the cluster token on every call when a secret is configured.
- `ClusterTokenInterceptor`: the server side. Every call but the standard health service
  (`grpc.health.v1.Health`, left open for probes) must carry the token in
  `x-baton-cluster-token` metadata; anything else is refused with UNAUTHENTICATED before the
  servicer runs (so an unauthenticated caller can neither generate, abort, read `Info` nor
  make a worker dial a peer of its choosing).
- `derive_key(secret, purpose)`: one key per use of the secret (the gRPC token, the KV
  transfer handshake), so seeing one on the wire never reveals another, nor the secret.

The token is HMAC-SHA256(secret, "baton grpc token v1") in hex, compared in constant time
(`hmac.compare_digest`). Without TLS it travels in clear text: it keeps out anyone who
cannot read the cluster's traffic (docs/security.md says what that leaves open).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import grpc

from baton.protos.errors import BatonError, ErrorCode, abort_with

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "x-baton-cluster-token"
"""gRPC metadata key carrying the cluster token."""
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Method prefixes served without the token (liveness / readiness probes)."""


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one use of the cluster secret (b"" when there is no secret)."""
    if not secret:
        return b""
    return hmac.new(secret, f"baton {purpose} v1".encode(), hashlib.sha256).digest()


def read_secret_file(path: str) -> bytes:
    """The secret in `path` (surrounding whitespace stripped); ValueError when it is empty or short."""
    secret = Path(path).read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"cluster secret file {path} holds {len(secret)} bytes; use at least 16 "
                         "(e.g. `openssl rand -hex 32 > FILE`)")
    return secret


@dataclass(frozen=True)
class ClusterCredentials:
    """What proves membership of the cluster (empty: an open cluster)."""

    secret: bytes = b""
    """The shared cluster secret."""
    tls_cert: Optional[bytes] = None
    """PEM certificate chain this process presents (server and, with a CA, client)."""
    tls_key: Optional[bytes] = None
    """PEM private key of `tls_cert`."""
    tls_ca: Optional[bytes] = None
    """PEM CA bundle that peers' certificates must chain to; on a server it also requires client certificates (mTLS)."""

    @classmethod
    def from_files(cls, secret_file: str = "", tls_cert_file: str = "", tls_key_file: str = "",
                   tls_ca_file: str = "") -> "ClusterCredentials":
        """Load the files the flags name (empty names: not configured)."""
        if bool(tls_cert_file) != bool(tls_key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return cls(read_secret_file(secret_file) if secret_file else b"", read(tls_cert_file), read(tls_key_file),
                   read(tls_ca_file))

    @property
    def enabled(self) -> bool:
        """True when calls must be authenticated (a secret or TLS is configured)."""
        return bool(self.secret) or self.tls

    @property
    def tls(self) -> bool:
        """True when channels and servers use TLS."""
        return self.tls_cert is not None or self.tls_ca is not None

    @functools.cached_property
    def token(self) -> str:
        """The gRPC token derived from the secret ("" without one); derived once, not per call."""
        key = derive_key(self.secret, "grpc token")
        return key.hex()

    def server_credentials(self) -> Optional[grpc.ServerCredentials]:
        """TLS credentials for a server port (None: plaintext)."""
        if self.tls_cert is None:
            if self.tls_ca is not None:
                raise ValueError("a TLS server needs --tls-cert-file and --tls-key-file")
            return None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca,
                                           require_client_auth=self.tls_ca is not None)

    def channel_credentials(self) -> Optional[grpc.ChannelCredentials]:
        """TLS credentials for a channel (None: plaintext)."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca, private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def check_token(self, presented: Optional[str]) -> bool:
        """True when `presented` is this cluster's token (always True without a secret)."""
        if not self.secret:
            return True
        return hmac.compare_digest((presented or "").encode(), self.token.encode())


OPEN = ClusterCredentials()
"""An open cluster: no secret, no TLS."""


def add_port(server: grpc.aio.Server, address: str, credentials: ClusterCredentials) -> int:
    """Bind `address` on `server`, with TLS when configured; returns the port (0: not bound)."""
    tls = credentials.server_credentials()
    return server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)


def open_channel(address: str, credentials: Optional[ClusterCredentials] = OPEN,
                 options: Optional[Sequence[tuple[str, Any]]] = None) -> grpc.aio.Channel:
    """A `grpc.aio` channel to a cluster member: TLS when configured, the cluster token on
    every call when a secret is configured, a plain insecure channel otherwise (None: OPEN)."""
    credentials = credentials or OPEN
    interceptors = _token_interceptors(credentials.token) if credentials.secret else None
    tls = credentials.channel_credentials()
    if tls is not None:
        return grpc.aio.secure_channel(address, tls, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(TOKEN_METADATA_KEY, token)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _Token:
    """Holds the token; mixed into one interceptor per call shape (a grpc.aio channel files each
    interceptor under the first shape it is an instance of, so one class cannot serve all four)."""

    def __init__(self, token: str) -> None:
        self.token = token


class _UnaryUnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _UnaryStreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _StreamUnaryToken(_Token, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class _StreamStreamToken(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def _token_interceptors(token: str) -> list[Any]:
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the cluster token (UNAUTHENTICATED), except `OPEN_SERVICES`."""

    def __init__(self, credentials: ClusterCredentials) -> None:
        self.credentials = credentials
        self.refused = 0
        """Calls refused so far (logged at most once a second)."""
        self._logged_at = 0.0

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if not self.credentials.secret or details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        presented = next((value for key, value in (details.invocation_metadata or ())
                          if key == TOKEN_METADATA_KEY), None)
        if self.credentials.check_token(presented if isinstance(presented, str) else None):
            return await continuation(details)
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            self._logged_at = now
            log.warning("refused %s: %s cluster token (%d calls refused so far)", details.method,
                        "wrong" if presented else "no", self.refused)
        handler = await continuation(details)
        return _refusing(handler) if handler is not None else None


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""
    error = BatonError(ErrorCode.UNAUTHENTICATED, "this worker requires the cluster token (--cluster-secret-file)")

    async def refuse(request_or_iterator, context):
        await abort_with(context, error)

    async def refuse_stream(request_or_iterator, context):
        await abort_with(context, error)
        yield  # pragma: no cover  (makes this an async generator; abort raises first)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)


def server_interceptors(credentials: ClusterCredentials) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a cluster member's gRPC server installs ([] for an open cluster)."""
    return [ClusterTokenInterceptor(credentials)] if credentials.secret else []
