"""A Python grpcio client over TLS, for tests/reliability (tls.rs).

Usage: reliability_tls.py HOST:PORT CA.pem [CLIENT.pem CLIENT.key]
Connects with grpc.ssl_channel_credentials (server name "localhost"),
learns the protocol through reflection, sends one DetectOne and prints one
JSON line: {"ok": true, "frame_id": ..., "error": ...} or, when the
connection or call fails, {"ok": false, "code": ..., "detail": ...}.
Exits 0 either way: the Rust test decides what was expected.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    address, ca = sys.argv[1], sys.argv[2]
    key = cert = None
    if len(sys.argv) > 4:
        cert, key = read(sys.argv[3]), read(sys.argv[4])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=key, certificate_chain=cert
    )
    channel = grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    try:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        Frame = message_factory.GetMessageClass(pool.FindMessageTypeByName("odin.v1.Frame"))
        Verdict = message_factory.GetMessageClass(pool.FindMessageTypeByName("odin.v1.Verdict"))
        frame = Frame(frame_id="py-tls")
        frame.raw.width, frame.raw.height, frame.raw.channels = 32, 32, 3
        frame.raw.pixels = bytes((i * 7) % 256 for i in range(32 * 32 * 3))
        detect_one = channel.unary_unary(
            "/odin.v1.Detector/DetectOne",
            request_serializer=Frame.SerializeToString,
            response_deserializer=Verdict.FromString,
        )
        verdict = detect_one(frame, timeout=20)
        print(json.dumps({
            "ok": True,
            "frame_id": verdict.frame_id,
            "error": verdict.error.reason if verdict.HasField("error") else None,
        }))
    except grpc.RpcError as e:
        print(json.dumps({"ok": False, "code": str(e.code()), "detail": e.details()}))
    except Exception as e:  # reflection failing on a refused connection, ...
        print(json.dumps({"ok": False, "code": type(e).__name__, "detail": str(e)}))


if __name__ == "__main__":
    main()
