"""The signature every server interceptor here implements (``grpc.aio.ServerInterceptor.intercept_service``),
named once: the admission, metrics and API-key interceptors take a ``Continuation`` and return a ``Handler``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

#: the method's handler, None for a method this server does not serve
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any] | None"
#: the rest of the interceptor chain (and then the server's method lookup)
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]"
