"""Transport security and authentication, server side and channel side, for both services.

Server: :class:`ServerSecurity` holds TLS material (:class:`ServerTls`; with ``client_ca``, mutual
TLS: clients must present a certificate signed by it) and an optional API key. With a key,
:class:`ApiKeyInterceptor` answers every RPC but ``grpc.health.v1.Health`` with UNAUTHENTICATED
unless the call carries the metadata ``authorization: Bearer <key>`` (compared in constant time).
Health is exempt so that orchestrator probes need no secret; reflection is not: it describes the API,
and grpcurl sends ``-H`` headers on its reflection calls too.

Channel: :class:`ChannelSecurity` (the CA to trust, a client certificate for mutual TLS, the server's
API key) builds the channels of the tokenizer service to its engine and of the Python clients
(:func:`aio_channel`, :func:`sync_channel`). The key travels as per-call metadata added by a client
interceptor, so it works over plaintext loopback as well as TLS.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from service_common.interceptor_types import Continuation, Handler

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"  # exempt from the API key (probes)
API_KEY_ENV = "QWEN3SERVE_API_KEY"  # the server's own key when no option gives one
_MIN_KEY_CHARS = 16


def read_pem(path: str | Path, what: str, marker: str) -> bytes:
    """The bytes of a PEM file; ValueError naming ``what`` (an option) if unreadable or not PEM ``marker``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise ValueError(f"{what}: {path} holds no PEM {marker.lower()}")
    return data


def read_api_key(path: str | Path, what: str) -> str:
    """The key in a file (surrounding whitespace, e.g. a trailing newline, stripped)."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def check_api_key(key: str, what: str) -> None:
    """A key must be sendable as a header value and not trivially guessable."""
    if len(key) < _MIN_KEY_CHARS:
        raise ValueError(
            f"{what}: must be at least {_MIN_KEY_CHARS} characters, got {len(key)} (e.g. `openssl rand -hex 32`)"
        )
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise ValueError(f"{what}: must be printable ASCII without spaces")


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and private key (PEM bytes); ``client_ca``: require client certs signed by it."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (None: plaintext) and the API key every RPC but health must carry (None: no key)."""

    tls: ServerTls | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_api_key(self.api_key, "api_key")

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.api_key is None else [ApiKeyInterceptor(self.api_key)]


@dataclass(frozen=True)
class ChannelTls:
    """TLS to a server: ``root_certificates`` to trust (None: the system's), and a client certificate
    chain and key for mutual TLS (both or neither). PEM bytes."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its private key go together: give both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a secured server: TLS (None: plaintext) and its API key (None: send none)."""

    tls: ChannelTls | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.api_key is None else (("authorization", f"Bearer {self.api_key}"),)


# ---- server side ---------------------------------------------------------------------------------
def _denied(handler: grpc.RpcMethodHandler[Any, Any] | None, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED without parsing the request
    (no deserializer: an unauthenticated body is never parsed)."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # type: ignore[unreachable]  # abort raises; the yield makes this an async generator, as streams are

    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.stream_stream_rpc_method_handler(deny_stream)  # reflection


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without ``authorization: Bearer <api_key>``, health excepted."""

    def __init__(self, api_key: str) -> None:
        self._expected = api_key.encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        given = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if not given:
            return _denied(handler, "missing 'authorization: Bearer <key>' metadata")
        value = given[0].encode() if isinstance(given[0], str) else given[0]
        scheme, _, token = value.partition(b" ")
        # One key, compared in constant time; the scheme is case-insensitive (RFC 6750).
        if len(given) > 1 or scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._expected):
            return _denied(handler, "invalid API key")
        return handler


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; hostnames other than ``localhost`` count as exposed."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, security: ServerSecurity | None) -> bool:
    """Log one warning when ``host`` is reachable from other machines with neither TLS nor a key."""
    if is_loopback(host) or (security is not None and (security.tls is not None or security.api_key is not None)):
        return False
    log.warning(
        "listening on a non-loopback address with neither TLS nor an API key: anyone who reaches "
        "it can use it (see --tls-cert/--tls-key, --api-key-file)",
        extra={"host": host},
    )
    return True


# ---- channel side --------------------------------------------------------------------------------
def _with_metadata(
    details: Any,
    extra: Sequence[tuple[str, str]],
    factory: Callable[..., Any],
    metadata_type: Callable[[tuple[tuple[str, Any], ...]], Any] = tuple,
) -> Any:
    metadata = metadata_type((*tuple(details.metadata or ()), *extra))
    return factory(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _AioMetadata:
    """Adds fixed metadata (the API key) to the calls of an aio channel; one subclass per call kind,
    since an aio channel files each interceptor under the first kind it is an instance of."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: Any) -> Any:
        return _with_metadata(details, self._metadata, grpc.aio.ClientCallDetails, grpc.aio.Metadata.from_tuple)


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(self._details(client_call_details), requests)


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(self._details(client_call_details), requests)


@dataclass(frozen=True)
class _SyncCallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None


class _SyncMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the API key) to every call of a blocking channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _call(self, continuation: Any, details: Any, request_or_iterator: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata, _SyncCallDetails), request_or_iterator)

    # One function for the four kinds of call; grpc's stubs type each kind's method apart.
    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _call  # type: ignore[assignment]


def aio_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), security: ChannelSecurity | None = None
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target``: TLS per ``security.tls`` (else plaintext), the API key on every call."""
    security = security or ChannelSecurity()
    interceptors = (
        [kind(security.metadata) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
        if security.metadata
        else None
    )
    if security.tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, security.tls.credentials(), options=list(options), interceptors=interceptors)


def sync_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), security: ChannelSecurity | None = None
) -> grpc.Channel:
    """A blocking channel to ``target``: TLS per ``security.tls`` (else plaintext), the API key on every call."""
    security = security or ChannelSecurity()
    channel = (
        grpc.insecure_channel(target, options=list(options))
        if security.tls is None
        else grpc.secure_channel(target, security.tls.credentials(), options=list(options))
    )
    if security.metadata:
        channel = grpc.intercept_channel(channel, _SyncMetadata(security.metadata))
    return channel
