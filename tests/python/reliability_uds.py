"""A Python grpcio client over a Unix socket, for tests/reliability (uds.rs).

Usage: reliability_uds.py unix:/path/to.sock
Learns the protocol through reflection, sends one DetectOne and prints one
JSON line: {"ok": true, "frame_id": ...} or {"ok": false, "code": ..., "detail": ...}.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    try:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        Frame = message_factory.GetMessageClass(pool.FindMessageTypeByName("odin.v1.Frame"))
        Verdict = message_factory.GetMessageClass(pool.FindMessageTypeByName("odin.v1.Verdict"))
        frame = Frame(frame_id="py-uds")
        frame.raw.width, frame.raw.height, frame.raw.channels = 32, 32, 3
        frame.raw.pixels = bytes((i * 7) % 256 for i in range(32 * 32 * 3))
        detect_one = channel.unary_unary(
            "/odin.v1.Detector/DetectOne",
            request_serializer=Frame.SerializeToString,
            response_deserializer=Verdict.FromString,
        )
        verdict = detect_one(frame, timeout=20)
        print(json.dumps({"ok": True, "frame_id": verdict.frame_id}))
    except grpc.RpcError as e:
        print(json.dumps({"ok": False, "code": str(e.code()), "detail": e.details()}))
    except Exception as e:
        print(json.dumps({"ok": False, "code": type(e).__name__, "detail": str(e)}))


if __name__ == "__main__":
    main()
