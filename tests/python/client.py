"""An independent client for odin-sidecar: Python grpcio, no generated stubs.

It learns the protocol from the server itself through gRPC reflection, so it
shares no code with the Rust side. Usage: client.py HOST:PORT IMAGES.u8
Prints one JSON document with the verdicts it received.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    address, images_path = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("odin.v1.Detector")
    Frame = message_factory.GetMessageClass(pool.FindMessageTypeByName("odin.v1.Frame"))
    Verdict = message_factory.GetMessageClass(pool.FindMessageTypeByName("odin.v1.Verdict"))

    with open(images_path, "rb") as f:
        pixels = f.read(32 * 32 * 3 * 6)

    def frame(i):
        f = Frame(frame_id=f"py-{i}")
        f.raw.width, f.raw.height, f.raw.channels = 32, 32, 3
        f.raw.pixels = pixels[i * 3072 : (i + 1) * 3072]
        f.attributes["client"] = "python"
        return f

    detect_one = channel.unary_unary(
        "/odin.v1.Detector/DetectOne",
        request_serializer=Frame.SerializeToString,
        response_deserializer=Verdict.FromString,
    )
    detect = channel.stream_stream(
        "/odin.v1.Detector/Detect",
        request_serializer=Frame.SerializeToString,
        response_deserializer=Verdict.FromString,
    )

    def summary(v):
        return {
            "frame_id": v.frame_id,
            "predicted_class": v.predicted_class,
            "max_softmax": v.max_softmax,
            "error": v.error.reason if v.HasField("error") else None,
            "client": v.attributes.get("client"),
        }

    one = detect_one(frame(0), timeout=30)
    streamed = [summary(v) for v in detect(iter([frame(i) for i in range(1, 6)]), timeout=30)]
    print(json.dumps({
        "methods": [m.name for m in service.methods],
        "detect_one": summary(one),
        "detect": streamed,
    }))


if __name__ == "__main__":
    main()
