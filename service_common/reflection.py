"""gRPC server reflection, v1 as well as v1alpha.

grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha.ServerReflection``; newer grpcurl and grpc-js
ask ``grpc.reflection.v1`` first. The v1 messages are v1alpha's with another package name (same fields,
same numbers), so one servicer serves both: v1 requests are parsed with the v1alpha message classes and
its answers written with them, byte for byte what a v1 client expects.

The v1 file itself is registered in the descriptor pool (v1alpha's descriptor renamed), so reflection can
describe ``grpc.reflection.v1.ServerReflection`` like any other listed service.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
_V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{_V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection file: v1alpha's, its package, file name and type references renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name, proto.package = _V1_FILE, _V1_PACKAGE
    # The official v1 file's options (v1alpha's name v1alpha packages).
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # (assigning "" would set it: descriptor fields have presence)
                field.type_name = field.type_name.replace(old, f".{_V1_PACKAGE}.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, f".{_V1_PACKAGE}.")
        method.output_type = method.output_type.replace(old, f".{_V1_PACKAGE}.")
    return proto


def _register_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str], pool: object) -> None:
    """Serve reflection v1alpha and v1 on ``server`` for ``service_names`` (both reflection services are
    listed too). ``pool``: the descriptor pool to answer from (it must resolve the default pool's files)."""
    _register_v1_file(descriptor_pool.Default())
    names = [*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=pool)  # type: ignore[arg-type]  # duck-typed pools too
    servicer = reflection_aio.ReflectionServicer(names, pool=pool)
    handler = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
