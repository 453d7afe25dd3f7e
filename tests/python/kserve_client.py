"""An independent KServe v2 / Open Inference Protocol client for odin-sidecar.

It drives the sidecar's inference.GRPCInferenceService with NVIDIA's own
client library, `tritonclient.grpc` (pinned in scripts/requirements-test.txt),
so it shares no code with the Rust side, and prints ONE JSON document on
stdout for a Rust test to compare with the odin.v1 verdicts of the same frames.

    kserve_client.py --url HOST:PORT --model NAME --images SET.u8 --count N
                     [--encoded] [--logits] [--method M] [--temperature T]
                     [--epsilon E] [--threshold X] [--model-version V]
    kserve_client.py --url HOST:PORT --model NAME --images SET.u8 --bad

SET.u8 holds n x h x w x c uint8 pixels (NHWC, RGB), described by SET.json
({"n", "h", "w", "c", ...}); the first N images are used.

The server's contract this client is written against:
  model NAME (the model card's name), version "1";
  inputs, exactly one per request:
    input    FP32  [N,3,H,W]  normalized NCHW tensor
    image    UINT8 [N,H,W,3]  raw RGB pixels, any H and W
    encoded  BYTES [N]        each element a PNG or JPEG file
  outputs: score FP32 [N], in_distribution BOOL [N], predicted_class INT64 [N],
    max_softmax FP32 [N], and logits FP32 [N,K] only when requested;
  request parameters: method (string), temperature, epsilon, threshold
    (double).

Normal mode sends, with the same scoring parameters each time:
  "infer":          the N images as one ModelInfer request (image UINT8);
  "stream":         the N images one request each on ModelStreamInfer;
  "stream_batched": the N images as one request on that same stream;
  "encoded":        with --encoded, the N images as PNG files in one
                    ModelInfer request (encoded BYTES), else null;
  "encoded_stream": with --encoded, the N PNG files one request each on the
                    stream, else null.
Each of those is a list of N {"score", "in_distribution", "predicted_class",
"max_softmax"} (plus "logits" with --logits), or null where the call failed;
an element the server answered with an error is null. Every failure goes to
"errors" as {"phase", "index", "code", "message"}; code is the gRPC status
name (e.g. "INVALID_ARGUMENT") or null for a stream response's error_message.

--bad sends deliberately wrong requests and reports, under "bad", each case's
outcome: {"ok": false, "code": "INVALID_ARGUMENT", "message": "..."}, or
{"ok": true, ...} when the server accepted it.

Exit status: 0 when the JSON document was printed (the caller checks
"errors"); 2, with one line on stderr and nothing on stdout, when the server
cannot be reached or the arguments or the image set are wrong.
"""
import argparse
import json
import os
import struct
import sys
import threading
import time
import zlib

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

OUTPUTS = {  # name -> (datatype, rank)
    "score": ("FP32", 1),
    "in_distribution": ("BOOL", 1),
    "predicted_class": ("INT64", 1),
    "max_softmax": ("FP32", 1),
}
LOGITS = "logits"


class Fatal(Exception):
    pass


def code_name(exc):
    """'StatusCode.INVALID_ARGUMENT' -> 'INVALID_ARGUMENT'; None when the
    error carries no gRPC status (a stream response's error_message)."""
    status = exc.status() if isinstance(exc, InferenceServerException) else None
    if not status:
        return None
    return status.split(".", 1)[1] if status.startswith("StatusCode.") else status


def error_message(exc):
    if isinstance(exc, InferenceServerException):
        return exc.message()
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ images

def load_images(path, count):
    header_path = os.path.splitext(path)[0] + ".json"
    try:
        with open(header_path) as f:
            header = json.load(f)
        n, h, w, c = (int(header[k]) for k in ("n", "h", "w", "c"))
        pixels = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError, KeyError) as e:
        raise Fatal(f"cannot read image set {path} / {header_path}: {e}")
    if c != 3:
        raise Fatal(f"{path}: {c} channels, the client sends RGB (3)")
    if pixels.size != n * h * w * c:
        raise Fatal(f"{path}: {pixels.size} bytes, header says {n}x{h}x{w}x{c}")
    if not 1 <= count <= n:
        raise Fatal(f"--count {count}: the set has {n} images")
    return pixels.reshape(n, h, w, c)[:count].copy()


def png(rgb):
    """A minimal PNG (8-bit RGB, no interlace) of an HxWx3 uint8 array."""
    h, w, _ = rgb.shape

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- requests

def image_input(images):
    t = grpcclient.InferInput("image", list(images.shape), "UINT8")
    t.set_data_from_numpy(images)
    return t


def encoded_input(files):
    arr = np.array(files, dtype=np.object_)
    t = grpcclient.InferInput("encoded", [len(files)], "BYTES")
    t.set_data_from_numpy(arr)
    return t


def requested_outputs(logits):
    if not logits:
        return None  # the server's default outputs
    return [grpcclient.InferRequestedOutput(n) for n in list(OUTPUTS) + [LOGITS]]


def scoring_parameters(args):
    params = {}
    if args.method is not None:
        params["method"] = args.method
    for key in ("temperature", "epsilon", "threshold"):
        value = getattr(args, key)
        if value is not None:
            params[key] = float(value)  # tritonclient sends a float as double_param
    return params or None


def param_value(p):
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def response_summary(result):
    r = result.get_response()
    return {
        "model_name": r.model_name,
        "model_version": r.model_version,
        "id": r.id,
        "parameters": {k: param_value(v) for k, v in sorted(r.parameters.items())},
        "outputs": [
            {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in r.outputs
        ],
        "raw_output_contents": len(r.raw_output_contents),
    }


def decode(result, n, logits):
    """The N per-image verdicts of one response, checked against the contract;
    raises ValueError naming what is wrong."""
    r = result.get_response()
    if r.outputs and len(r.raw_output_contents) != len(r.outputs):
        # tritonclient's InferResult.as_numpy only reads non-BYTES data from
        # raw_output_contents, so a server that answers in typed contents
        # is unusable from it.
        raise ValueError(
            f"{len(r.raw_output_contents)} raw_output_contents for {len(r.outputs)} outputs: "
            "tritonclient needs every output in raw_output_contents"
        )
    declared = {o.name: o for o in r.outputs}
    wanted = dict(OUTPUTS)
    if logits:
        wanted[LOGITS] = ("FP32", 2)
    arrays = {}
    for name, (datatype, rank) in wanted.items():
        o = declared.get(name)
        if o is None:
            raise ValueError(f"output '{name}' missing (got {sorted(declared)})")
        if o.datatype != datatype:
            raise ValueError(f"output '{name}' is {o.datatype}, expected {datatype}")
        if len(o.shape) != rank or o.shape[0] != n:
            raise ValueError(f"output '{name}' has shape {list(o.shape)}, expected [{n}{', K' if rank == 2 else ''}]")
        arrays[name] = result.as_numpy(name)
    if not logits and LOGITS in declared:
        raise ValueError("output 'logits' returned though not requested")
    out = []
    for i in range(n):
        v = {
            "score": float(arrays["score"][i]),
            "in_distribution": bool(arrays["in_distribution"][i]),
            "predicted_class": int(arrays["predicted_class"][i]),
            "max_softmax": float(arrays["max_softmax"][i]),
        }
        if logits:
            v["logits"] = [float(x) for x in arrays[LOGITS][i]]
        out.append(v)
    return out


# ------------------------------------------------------------------- modes

class Report:
    def __init__(self):
        self.errors = []

    def error(self, phase, exc_or_msg, index=None, code=None):
        if isinstance(exc_or_msg, BaseException):
            code, msg = code_name(exc_or_msg), error_message(exc_or_msg)
        else:
            msg = exc_or_msg
        self.errors.append({"phase": phase, "index": index, "code": code, "message": msg})


def connect(args):
    client = grpcclient.InferenceServerClient(url=args.url)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            live = client.is_server_live(client_timeout=args.timeout)
            return client, live
        except InferenceServerException as e:
            if time.monotonic() >= deadline:
                client.close()
                raise Fatal(
                    f"cannot reach the server at {args.url}: {code_name(e) or 'ERROR'}: {error_message(e)}"
                )
            time.sleep(0.2)


def call(report, phase, fn, default=None):
    try:
        return fn()
    except InferenceServerException as e:
        report.error(phase, e)
        return default


def metadata(client, args, report):
    doc = {}
    doc["ready"] = call(report, "server_ready", lambda: client.is_server_ready(client_timeout=args.timeout))
    doc["model_ready"] = call(
        report, "model_ready",
        lambda: client.is_model_ready(args.model, args.model_version, client_timeout=args.timeout),
    )
    sm = call(report, "server_metadata", lambda: client.get_server_metadata(client_timeout=args.timeout))
    doc["server_metadata"] = None if sm is None else {
        "name": sm.name, "version": sm.version, "extensions": list(sm.extensions),
    }
    mm = call(
        report, "model_metadata",
        lambda: client.get_model_metadata(args.model, args.model_version, client_timeout=args.timeout),
    )

    def tensors(ts):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    doc["model_metadata"] = None if mm is None else {
        "name": mm.name, "versions": list(mm.versions), "platform": mm.platform,
        "inputs": tensors(mm.inputs), "outputs": tensors(mm.outputs),
    }
    return doc


def batched_infer(client, args, report, phase, inp, n):
    try:
        result = client.infer(
            args.model, [inp], model_version=args.model_version,
            outputs=requested_outputs(args.logits), request_id=f"{phase}-batch",
            parameters=scoring_parameters(args), client_timeout=args.timeout,
        )
    except InferenceServerException as e:
        report.error(phase, e)
        return None, None
    summary = response_summary(result)
    if summary["id"] != f"{phase}-batch":
        report.error(phase, f"response id {summary['id']!r}, request id {phase + '-batch'!r}")
    try:
        return decode(result, n, args.logits), summary
    except ValueError as e:
        report.error(phase, str(e))
        return None, summary


def streamed(client, args, report, images, pngs):
    """One stream: each image alone, the batch, then (with --encoded) each PNG
    alone. Responses are matched to requests by id."""
    n = len(images)
    plan = [(f"stream-{i}", "stream", i, image_input(images[i:i + 1]), 1) for i in range(n)]
    plan.append(("stream-batched", "stream_batched", None, image_input(images), n))
    if pngs is not None:
        plan += [(f"encoded-{i}", "encoded_stream", i, encoded_input([pngs[i]]), 1) for i in range(n)]
    by_id = {p[0]: p for p in plan}
    responses, failures = {}, []
    lock = threading.Lock()
    done = threading.Event()

    def callback(result, error):
        with lock:
            if error is not None:
                failures.append(error)
            else:
                responses.setdefault(result.get_response().id, []).append(result)
            answered = len(failures) + sum(map(len, responses.values()))
            # An error with a gRPC status ended the whole stream RPC.
            if answered >= len(plan) or (error is not None and code_name(error)):
                done.set()

    out = {"stream": [None] * n, "stream_batched": None,
           "encoded_stream": None if pngs is None else [None] * n}
    try:
        client.start_stream(callback=callback, stream_timeout=args.timeout)
    except InferenceServerException as e:
        report.error("stream", e)
        return out
    try:
        for request_id, _, _, inp, _ in plan:
            client.async_stream_infer(
                args.model, [inp], model_version=args.model_version,
                outputs=requested_outputs(args.logits), request_id=request_id,
                parameters=scoring_parameters(args),
            )
    except InferenceServerException as e:
        report.error("stream", e)
    done.wait(args.timeout)
    client.stop_stream(cancel_requests=not done.is_set())

    for e in failures:
        # tritonclient hands a stream response's error_message over without
        # the request id; a failed stream RPC comes with its gRPC status.
        report.error("stream", e)
    for request_id, results in responses.items():
        if request_id not in by_id:
            report.error("stream", f"response with id {request_id!r} matches no request")
            continue
        _, phase, index, _, size = by_id[request_id]
        if len(results) != 1:
            report.error(phase, f"{len(results)} responses for request {request_id!r}", index)
        try:
            verdicts = decode(results[0], size, args.logits)
        except ValueError as e:
            report.error(phase, str(e), index)
            continue
        if phase == "stream_batched":
            out["stream_batched"] = verdicts
        else:
            out[phase][index] = verdicts[0]
    missing = [p[0] for p in plan if p[0] not in responses]
    if missing and not failures:
        report.error("stream", f"no response for {missing}")
    return out


def normal(client, args, live, images):
    report = Report()
    n = len(images)
    doc = {"url": args.url, "model": args.model, "count": n, "live": live}
    doc.update(metadata(client, args, report))
    doc["infer"], infer_response = batched_infer(client, args, report, "infer", image_input(images), n)
    pngs = [png(im) for im in images] if args.encoded else None
    stream = streamed(client, args, report, images, pngs)
    doc["stream"], doc["stream_batched"] = stream["stream"], stream["stream_batched"]
    encoded_response = None
    if pngs is not None:
        doc["encoded"], encoded_response = batched_infer(
            client, args, report, "encoded", encoded_input(pngs), n)
    else:
        doc["encoded"] = None
    doc["encoded_stream"] = stream["encoded_stream"]
    # The whole responses of the two batched ModelInfer calls, less the data:
    # id, model version, response parameters, output names/datatypes/shapes.
    doc["infer_response"], doc["encoded_response"] = infer_response, encoded_response
    doc["errors"] = report.errors
    return doc


def bad(client, args, live, images):
    report = Report()
    images = images[:1]
    _, h, w, _ = images.shape
    model, version = args.model, args.model_version

    def outcome(fn):
        try:
            value = fn()
        except InferenceServerException as e:
            return {"ok": False, "code": code_name(e), "message": error_message(e)}
        return {"ok": True, "code": None, "message": None, "value": value}

    def infer(inputs, parameters=None, outputs=None, model_name=None):
        def run():
            result = client.infer(
                model_name or model, inputs, model_version=version, outputs=outputs,
                parameters=parameters, client_timeout=args.timeout,
            )
            return response_summary(result)
        return outcome(run)

    def tensor(name, shape, datatype, data):
        t = grpcclient.InferInput(name, list(data.shape), datatype)
        t.set_data_from_numpy(data)
        return t.set_shape(shape)  # a shape that may disagree with the data

    fp32_image = images.astype(np.float32)
    small = np.zeros((1, 3, h // 2, w // 2), dtype=np.float32)
    cases = {
        # An input name the model does not have.
        "unknown_input": infer([tensor("pixels", [1, h, w, 3], "UINT8", images)]),
        # `image` must be UINT8.
        "wrong_datatype": infer([tensor("image", [1, h, w, 3], "FP32", fp32_image)]),
        # Declared [2,H,W,3], but the raw contents hold one image.
        "byte_size_mismatch": infer([tensor("image", [2, h, w, 3], "UINT8", images)]),
        # `image` must be rank 4, NHWC with 3 channels.
        "image_rank": infer([tensor("image", [h, w, 3], "UINT8", images[0])]),
        # `input` must be exactly the model's [N,3,H,W].
        "input_shape_mismatch": infer([tensor("input", list(small.shape), "FP32", small)]),
        # Exactly one input per request.
        "two_inputs": infer([
            tensor("image", [1, h, w, 3], "UINT8", images),
            tensor("input", [1, 3, h, w], "FP32", np.zeros((1, 3, h, w), np.float32)),
        ]),
        # `encoded` elements must be decodable images.
        "encoded_garbage": infer([encoded_input([b"this is not an image"])]),
        # Out-of-bounds scoring parameters.
        "temperature_out_of_bounds": infer([image_input(images)], parameters={"temperature": 1e9}),
        "unknown_method": infer([image_input(images)], parameters={"method": "no_such_method"}),
        # An output the model does not have.
        "unknown_output": infer([image_input(images)], outputs=[grpcclient.InferRequestedOutput("no_such_output")]),
        # A model the server does not serve.
        "unknown_model": infer([image_input(images)], model_name="no_such_model"),
        "unknown_model_metadata": outcome(lambda: client.get_model_metadata(
            "no_such_model", "", client_timeout=args.timeout).name),
        "unknown_model_version": outcome(lambda: client.get_model_metadata(
            model, "999", client_timeout=args.timeout).name),
        "unknown_model_ready": outcome(lambda: client.is_model_ready(
            "no_such_model", "", client_timeout=args.timeout)),
    }
    cases["stream_unknown_input"] = bad_stream(client, args, images, h, w)
    return {"url": args.url, "model": model, "live": live, "bad": cases, "errors": report.errors}


def bad_stream(client, args, images, h, w):
    """A bad request then a good one on one stream: the first should come back
    as an error_message, and the stream should still answer the second."""
    got = []
    done = threading.Event()

    def callback(result, error):
        got.append((result, error))
        if len(got) >= 2 or (error is not None and code_name(error)):
            done.set()

    bad_input = grpcclient.InferInput("pixels", [1, h, w, 3], "UINT8").set_data_from_numpy(images)
    try:
        client.start_stream(callback=callback, stream_timeout=args.timeout)
        client.async_stream_infer(args.model, [bad_input], model_version=args.model_version, request_id="bad")
        client.async_stream_infer(args.model, [image_input(images)], model_version=args.model_version,
                                  request_id="good")
    except InferenceServerException as e:
        client.stop_stream(cancel_requests=True)
        return {"ok": False, "code": code_name(e), "message": error_message(e), "responses": []}
    done.wait(args.timeout)
    client.stop_stream(cancel_requests=not done.is_set())
    responses = []
    for result, error in got:
        if error is not None:
            responses.append({"ok": False, "code": code_name(error), "message": error_message(error)})
        else:
            responses.append({"ok": True, "id": result.get_response().id})
    first = responses[0] if responses else {"ok": None, "code": None, "message": "no response"}
    return {"ok": first["ok"], "code": first.get("code"), "message": first.get("message"),
            "responses": responses}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="HOST:PORT of the sidecar's gRPC server")
    p.add_argument("--model", required=True, help="model name, the model card's name")
    p.add_argument("--model-version", default="1", help='model version (default "1")')
    p.add_argument("--images", required=True, help="raw image set SET.u8, with SET.json beside it")
    p.add_argument("--count", type=int, default=4, help="number of images to send (default 4)")
    p.add_argument("--encoded", action="store_true", help="also send the images as PNG files")
    p.add_argument("--bad", action="store_true", help="send deliberately wrong requests instead")
    p.add_argument("--logits", action="store_true", help="request the logits output too")
    p.add_argument("--method", help="scoring method parameter: msp, odin, energy or maxlogit")
    p.add_argument("--temperature", type=float, help="temperature parameter")
    p.add_argument("--epsilon", type=float, help="epsilon parameter")
    p.add_argument("--threshold", type=float, help="threshold parameter")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="keep retrying the first call this many seconds (default 0)")
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    try:
        images = load_images(args.images, 1 if args.bad else args.count)
        client, live = connect(args)
        try:
            doc = (bad if args.bad else normal)(client, args, live, images)
        finally:
            client.close()
    except Fatal as e:
        print(f"kserve_client: {e}", file=sys.stderr)
        return 2
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
