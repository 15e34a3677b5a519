"""Command-line options both services share, defined once: names, help texts, defaults, validation.
Both CLIs (``python -m engine_service``, ``python -m tokenizer_service``), ``scripts/serve.py`` (``make serve``)
and the Python API's config defaults take them from here.

    add_model_option(parser, "...")             # --model
    add_server_options(parser, port=..., ...)   # --host/--port/--metrics-port, streams, message size, grace
    add_log_options(parser)                     # --log-level/--log-format
    add_limit_options(parser, RequestLimits)    # one --max-... option per field of a limits dataclass
    parser = argparse.ArgumentParser(...)
    add_security_options(parser)                # --tls-cert/--tls-key/--tls-client-ca, --api-key(-file)
    add_engine_channel_options(parser)          # tokenizer only: how to reach a secured engine
    args = parser.parse_args(argv)
    security = parse_or_exit(parser, server_security, args)   # bad values: one error line, exit 2

The builders read the PEM and key files at once, so a missing or wrong file fails before anything
listens, with a message naming the option.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Literal, TypeVar

from service_common.security import (
    API_KEY_ENV,
    ChannelSecurity,
    ChannelTls,
    ServerSecurity,
    ServerTls,
    check_api_key,
    read_api_key,
    read_pem,
)
from service_common.server import ServerConfig

ENGINE_API_KEY_ENV = "QWEN3SERVE_ENGINE_API_KEY"
_CERT, _KEY = "CERTIFICATE", "PRIVATE KEY"

#: defaults of the options below (and of the config dataclasses the Python API builds)
DEFAULT_HOST = "127.0.0.1"
ENGINE_PORT = 50051
TOKENIZER_PORT = 50052
DEFAULT_GRACE_S = 10.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"
LogFormat = Literal["kv", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("kv", "json")
DEFAULT_LOG_FORMAT: LogFormat = "kv"

T = TypeVar("T")
if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    L = TypeVar("L", bound=DataclassInstance)


def option_name(field_name: str) -> str:
    """The command-line option of a config field: ``max_text_bytes`` -> ``--max-text-bytes``."""
    return "--" + field_name.replace("_", "-")


def add_model_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--model DIR`` (required); ``what`` says which files of the checkpoint this service reads."""
    parser.add_argument("--model", required=True, metavar="DIR", help=f"checkpoint directory: {what}")


def add_server_options(
    parser: argparse.ArgumentParser, *, port: int, streams: str, max_message_bytes: int, message_note: str = ""
) -> None:
    """Where the server listens, what it admits, how it drains: --host, --port, --metrics-port,
    --max-concurrent-streams (``streams`` names the limited RPCs), --max-message-mb, --grace-period."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=port, help="gRPC port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="port of the Prometheus /metrics endpoint, on --host; 0 disables it (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=ServerConfig.max_concurrent_streams,
        help=f"{streams} streams at once; more are answered RESOURCE_EXHAUSTED (health and the unary RPCs "
        "are never limited) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=max_message_bytes // 2**20,
        help=f"largest request or response message, MiB{message_note}; beyond it gRPC answers "
        "RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        "--grace",
        dest="grace_period",
        type=float,
        default=DEFAULT_GRACE_S,
        help="on SIGTERM/SIGINT, seconds running streams may finish; then they end ABORTED (default: %(default)s)",
    )


def server_config(args: argparse.Namespace, security: ServerSecurity) -> ServerConfig:
    """The ``ServerConfig`` of :func:`add_server_options`' arguments (and the security already parsed)."""
    return ServerConfig(
        max_concurrent_streams=args.max_concurrent_streams,
        max_message_bytes=args.max_message_mb * 2**20,
        security=security,
    )


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format (``service_common.logging.configure_logging``)."""
    parser.add_argument(
        "--log-level",
        default=DEFAULT_LOG_LEVEL,
        choices=LOG_LEVELS,
        help="least severe log records written (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default=DEFAULT_LOG_FORMAT,
        choices=LOG_FORMATS,
        help="key=value lines or JSON lines (default: %(default)s)",
    )


def add_limit_options(parser: argparse.ArgumentParser, limits: type[DataclassInstance]) -> None:
    """One ``--max-...`` option per field of the frozen ``limits`` dataclass (its ``help`` metadata says
    what it bounds), as the argument group "request limits"; parse back with :func:`limits_from_args`."""
    group = parser.add_argument_group(
        "request limits",
        "checked before any other work; a request beyond one is answered INVALID_ARGUMENT naming the "
        "field and the limit (sizes: UTF-8 bytes)",
    )
    for f in fields(limits):
        group.add_argument(
            option_name(f.name),
            type=int,
            default=f.default,
            metavar="N",
            help=f"{f.metadata['help']} (default: %(default)s)",
        )


def limits_from_args(limits: type[L], args: argparse.Namespace) -> L:
    """The ``limits`` dataclass from :func:`add_limit_options`' arguments."""
    return limits(**{f.name: getattr(args, f.name) for f in fields(limits)})


def add_security_options(parser: argparse.ArgumentParser) -> None:
    """The server's TLS and API-key options, as one argument group."""
    g = parser.add_argument_group(
        "security",
        "TLS, mutual TLS and an API key. With a key, every RPC but grpc.health.v1.Health (probes) "
        "needs the metadata 'authorization: Bearer KEY'; reflection needs it too.",
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=None,
        help="certificate chain of this server; with --tls-key, serve TLS only (default: %(default)s: plaintext)",
    )
    g.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert (default: %(default)s)")
    g.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        default=None,
        help="mutual TLS: accept only clients presenting a certificate signed by this CA; needs "
        "--tls-cert (default: %(default)s: no client certificate asked)",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="require this key (>= 16 printable characters); visible in `ps`, so prefer "
        f"--api-key-file or ${API_KEY_ENV} (default: %(default)s: ${API_KEY_ENV} if set, "
        "else no key)",
    )
    g.add_argument(
        "--api-key-file",
        metavar="PATH",
        default=None,
        help="file holding the key (surrounding whitespace ignored) (default: %(default)s)",
    )


def add_engine_channel_options(parser: argparse.ArgumentParser) -> None:
    """How the tokenizer service reaches a secured engine, as one argument group."""
    g = parser.add_argument_group(
        "engine connection security", "TLS and the API key of the channel to --engine (its health probe included)."
    )
    g.add_argument(
        "--engine-tls",
        action="store_true",
        default=False,
        help="connect to the engine over TLS, trusting the system's CAs unless --engine-tls-ca; "
        "implied by --engine-tls-ca and --engine-tls-cert (default: %(default)s)",
    )
    g.add_argument(
        "--engine-tls-ca",
        metavar="PEM",
        default=None,
        help="CA certificate(s) to trust for the engine's certificate (default: %(default)s: the system's)",
    )
    g.add_argument(
        "--engine-tls-cert",
        metavar="PEM",
        default=None,
        help="client certificate chain for an engine that requires mutual TLS (default: %(default)s)",
    )
    g.add_argument(
        "--engine-tls-key", metavar="PEM", default=None, help="private key of --engine-tls-cert (default: %(default)s)"
    )
    g.add_argument(
        "--engine-api-key",
        metavar="KEY",
        default=None,
        help=f"the engine's API key (default: %(default)s: ${ENGINE_API_KEY_ENV}, else ${API_KEY_ENV}, else none)",
    )
    g.add_argument(
        "--engine-api-key-file",
        metavar="PATH",
        default=None,
        help="file holding the engine's API key (default: %(default)s)",
    )


def _api_key(
    value: str | None, path: str | None, option: str, env: Mapping[str, str], env_names: tuple[str, ...]
) -> str | None:
    """The key from ``--option``, ``--option-file`` or the first set environment variable (in that order)."""
    if value is not None and path is not None:
        raise ValueError(f"--{option} and --{option}-file: give one of them")
    if value is not None:
        key, what = value, f"--{option}"
    elif path is not None:
        key, what = read_api_key(path, f"--{option}-file"), f"--{option}-file"
    else:
        name = next((n for n in env_names if env.get(n)), None)
        if name is None:
            return None
        key, what = env[name], f"${name}"
    check_api_key(key, what)
    return key


def server_security(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ServerSecurity:
    """The server's security from :func:`add_security_options`' arguments; ValueError naming the option."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    tls = None
    if args.tls_cert is not None:
        tls = ServerTls(
            read_pem(args.tls_cert, "--tls-cert", _CERT),
            read_pem(args.tls_key, "--tls-key", _KEY),
            None if args.tls_client_ca is None else read_pem(args.tls_client_ca, "--tls-client-ca", _CERT),
        )
    return ServerSecurity(tls, _api_key(args.api_key, args.api_key_file, "api-key", env, (API_KEY_ENV,)))


def engine_channel_security(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ChannelSecurity:
    """The engine channel's security from :func:`add_engine_channel_options`' arguments."""
    if (args.engine_tls_cert is None) != (args.engine_tls_key is None):
        raise ValueError("--engine-tls-cert and --engine-tls-key go together: give both or neither")
    tls = None
    if args.engine_tls or args.engine_tls_ca is not None or args.engine_tls_cert is not None:
        tls = ChannelTls(
            None if args.engine_tls_ca is None else read_pem(args.engine_tls_ca, "--engine-tls-ca", _CERT),
            None if args.engine_tls_cert is None else read_pem(args.engine_tls_cert, "--engine-tls-cert", _CERT),
            None if args.engine_tls_key is None else read_pem(args.engine_tls_key, "--engine-tls-key", _KEY),
        )
    key = _api_key(
        args.engine_api_key, args.engine_api_key_file, "engine-api-key", env, (ENGINE_API_KEY_ENV, API_KEY_ENV)
    )
    return ChannelSecurity(tls, key)


def parse_or_exit(
    parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], T], args: argparse.Namespace
) -> T:
    """``build(args)``; a ValueError becomes argparse's usage + one error line, exit status 2."""
    try:
        return build(args)
    except ValueError as exc:
        parser.error(str(exc))
