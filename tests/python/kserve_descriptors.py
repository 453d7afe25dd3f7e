"""Checks our KServe v2 / OIP proto against the one compiled into tritonclient.

Usage: kserve_descriptors.py DESCRIPTOR_SET

DESCRIPTOR_SET is a serialized google.protobuf.FileDescriptorSet that holds
proto/kserve/v2/grpc_service.proto (it may hold other files too, such as the
odin.v1 protos or imports): the one tonic-build writes with
file_descriptor_set_path, or, by hand,

    python -m grpc_tools.protoc -Iproto --include_imports \
        --descriptor_set_out=kserve.pb proto/kserve/v2/grpc_service.proto

The reference is tritonclient.grpc.service_pb2.DESCRIPTOR, the descriptors
NVIDIA compiles from Triton's grpc_service.proto into `tritonclient[grpc]`
(pinned: TRITONCLIENT_VERSION below). Asserted:

  * every message, nested message and enum of package `inference` in ours
    exists under the same full name in theirs, with the same fields both
    ways: name, number, type, label, type_name, oneof (index and name),
    map-ness, proto3 `optional` and field options; the same oneofs, the same
    nested types, the same message options (map_entry) and enum values;
  * our service inference.GRPCInferenceService has the RPCs we serve
    (REQUIRED_RPCS) and theirs has each of our RPCs with the same input and
    output types and client/server streaming flags.

Messages and RPCs that only Triton has (model config, statistics, repository,
shared memory, trace, logging) are listed and ignored. Prints a summary;
on any difference prints one line per difference and exits 1. Exits 2 when
the inputs cannot be read.
"""
import sys
from importlib import metadata

from google.protobuf import descriptor_pb2

TRITONCLIENT_VERSION = "2.73.0"
PACKAGE = "inference"
SERVICE = "inference.GRPCInferenceService"
REQUIRED_RPCS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
)

FDP = descriptor_pb2.FieldDescriptorProto


def die(msg):
    print(f"kserve_descriptors: {msg}", file=sys.stderr)
    sys.exit(2)


class Index:
    """Messages, enums and services of a set of files, by full name."""

    def __init__(self, files):
        self.files = list(files)
        self.messages = {}  # full name -> (DescriptorProto, file name)
        self.enums = {}  # full name -> (EnumDescriptorProto, file name)
        self.services = {}  # full name -> (ServiceDescriptorProto, file name)
        for f in self.files:
            prefix = f.package + "." if f.package else ""
            for m in f.message_type:
                self._add_message(prefix + m.name, m, f.name)
            for e in f.enum_type:
                self.enums[prefix + e.name] = (e, f.name)
            for s in f.service:
                self.services[prefix + s.name] = (s, f.name)

    def _add_message(self, full, m, fname):
        self.messages[full] = (m, fname)
        for n in m.nested_type:
            self._add_message(full + "." + n.name, n, fname)
        for e in m.enum_type:
            self.enums[full + "." + e.name] = (e, fname)

    def is_map(self, type_name):
        found = self.messages.get(type_name.lstrip("."))
        return bool(found and found[0].options.map_entry)


def ours_from(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        die(f"cannot read {path}: {e}")
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except Exception as e:  # DecodeError, or garbage
        die(f"{path} is not a serialized FileDescriptorSet: {e}")
    if not fds.file:
        die(f"{path} holds no files")
    return Index(fds.file)


def theirs():
    try:
        from tritonclient.grpc import service_pb2
    except Exception as e:
        die(f"cannot import tritonclient.grpc.service_pb2 "
            f"(pip install 'tritonclient[grpc]=={TRITONCLIENT_VERSION}'): {e}")
    files, seen = [], set()

    def add(fd):
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        p = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(p)
        files.append(p)

    add(service_pb2.DESCRIPTOR)
    return Index(files), service_pb2.DESCRIPTOR.name


def label_name(v):
    return FDP.Label.Name(v)


def type_name_of(v):
    return FDP.Type.Name(v)


def field_facts(field, msg, index):
    """The facts compared for one field, as printable values."""
    if field.HasField("oneof_index"):
        oneof = (field.oneof_index, msg.oneof_decl[field.oneof_index].name)
    else:
        oneof = None
    return {
        "number": field.number,
        "type": type_name_of(field.type),
        "label": label_name(field.label),
        "type_name": field.type_name,
        "oneof": oneof,
        "map": index.is_map(field.type_name) if field.type == FDP.TYPE_MESSAGE else False,
        "proto3_optional": field.proto3_optional,
        "default_value": field.default_value,
        "extendee": field.extendee,
        "options": field.options.SerializeToString(deterministic=True),
    }


def compare_message(full, ours, theirs, ours_ix, theirs_ix, diffs):
    o_fields = {f.name: f for f in ours.field}
    t_fields = {f.name: f for f in theirs.field}
    nfields = 0
    for name, of in o_fields.items():
        tf = t_fields.get(name)
        if tf is None:
            diffs.append(f"{full}.{name}: field #{of.number} is in ours, not in tritonclient")
            continue
        nfields += 1
        ofacts = field_facts(of, ours, ours_ix)
        tfacts = field_facts(tf, theirs, theirs_ix)
        for key in ofacts:
            if ofacts[key] != tfacts[key]:
                diffs.append(f"{full}.{name}: {key} ours={ofacts[key]!r} tritonclient={tfacts[key]!r}")
    for name, tf in t_fields.items():
        if name not in o_fields:
            diffs.append(
                f"{full}.{name}: field #{tf.number} ({label_name(tf.label)} "
                f"{type_name_of(tf.type)} {tf.type_name}) is in tritonclient, not in ours"
            )
    # Two fields of one message must not share a number (protoc already refuses),
    # but a renamed field shows up above as missing on both sides; say so plainly.
    t_by_number = {f.number: f.name for f in theirs.field}
    for of in ours.field:
        if of.name not in t_fields and of.number in t_by_number:
            diffs.append(f"{full}: field #{of.number} is '{of.name}' in ours, "
                         f"'{t_by_number[of.number]}' in tritonclient")
    o_oneofs = [d.name for d in ours.oneof_decl]
    t_oneofs = [d.name for d in theirs.oneof_decl]
    if o_oneofs != t_oneofs:
        diffs.append(f"{full}: oneofs ours={o_oneofs} tritonclient={t_oneofs}")
    o_nested = sorted(n.name for n in ours.nested_type) + sorted(e.name for e in ours.enum_type)
    t_nested = sorted(n.name for n in theirs.nested_type) + sorted(e.name for e in theirs.enum_type)
    for n in sorted(set(t_nested) - set(o_nested)):
        diffs.append(f"{full}.{n}: nested type is in tritonclient, not in ours")
    if ours.options.map_entry != theirs.options.map_entry:
        diffs.append(f"{full}: map_entry ours={ours.options.map_entry} "
                     f"tritonclient={theirs.options.map_entry}")
    for what in ("extension", "extension_range", "reserved_range", "reserved_name"):
        if list(getattr(ours, what)) != list(getattr(theirs, what)):
            diffs.append(f"{full}: {what} differs")
    return nfields


def compare_enum(full, ours, theirs, diffs):
    o = [(v.name, v.number) for v in ours.value]
    t = [(v.name, v.number) for v in theirs.value]
    if o != t:
        diffs.append(f"{full}: enum values ours={o} tritonclient={t}")


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    ours_ix = ours_from(argv[1])
    theirs_ix, theirs_file = theirs()
    try:
        tc_version = metadata.version("tritonclient")
    except metadata.PackageNotFoundError:
        tc_version = "?"

    diffs = []
    our_files = [f for f in ours_ix.files if f.package == PACKAGE]
    if not our_files:
        die(f"{argv[1]} has no file of package '{PACKAGE}' "
            f"(files: {[f.name for f in ours_ix.files]})")
    for f in our_files:
        if f.syntax != "proto3":
            diffs.append(f"{f.name}: syntax ours={f.syntax!r} tritonclient='proto3'")

    ours_msgs = {k: v for k, v in ours_ix.messages.items() if k.startswith(PACKAGE + ".")}
    ours_enums = {k: v for k, v in ours_ix.enums.items() if k.startswith(PACKAGE + ".")}
    nfields = nnested = nmaps = 0
    for full in sorted(ours_msgs):
        m, _ = ours_msgs[full]
        t = theirs_ix.messages.get(full)
        if t is None:
            diffs.append(f"{full}: message is in ours, not in tritonclient")
            continue
        if full.count(".") > 1:
            nnested += 1
        nmaps += m.options.map_entry
        nfields += compare_message(full, m, t[0], ours_ix, theirs_ix, diffs)
    for full in sorted(ours_enums):
        t = theirs_ix.enums.get(full)
        if t is None:
            diffs.append(f"{full}: enum is in ours, not in tritonclient")
            continue
        compare_enum(full, ours_enums[full][0], t[0], diffs)

    rpcs = []
    if SERVICE not in ours_ix.services:
        diffs.append(f"{SERVICE}: service missing from ours")
    elif SERVICE not in theirs_ix.services:
        diffs.append(f"{SERVICE}: service missing from tritonclient")
    else:
        osvc = ours_ix.services[SERVICE][0]
        tsvc = theirs_ix.services[SERVICE][0]
        tmeth = {m.name: m for m in tsvc.method}
        rpcs = [m.name for m in osvc.method]
        for need in REQUIRED_RPCS:
            if need not in rpcs:
                diffs.append(f"{SERVICE}.{need}: rpc missing from ours")
        for om in osvc.method:
            tm = tmeth.get(om.name)
            if tm is None:
                diffs.append(f"{SERVICE}.{om.name}: rpc is in ours, not in tritonclient")
                continue
            for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
                ov, tv = getattr(om, key), getattr(tm, key)
                if ov != tv:
                    diffs.append(f"{SERVICE}.{om.name}: {key} ours={ov!r} tritonclient={tv!r}")
        theirs_only_rpcs = [m for m in tmeth if m not in rpcs]
    theirs_only_msgs = sorted(
        k for k in theirs_ix.messages
        if k.startswith(PACKAGE + ".") and k not in ours_msgs and k.count(".") == 1
    )

    print(f"ours:   {argv[1]}: {', '.join(f.name for f in our_files)}")
    print(f"theirs: tritonclient {tc_version} (pinned {TRITONCLIENT_VERSION}): "
          f"{theirs_file}, package {PACKAGE}")
    if tc_version != TRITONCLIENT_VERSION:
        print(f"warning: tritonclient {tc_version} installed, the check is pinned "
              f"to {TRITONCLIENT_VERSION}")
    print(f"compared: {len(ours_msgs)} messages ({nnested} nested, {nmaps} of them map entries), "
          f"{len(ours_enums)} enums, {nfields} fields, {len(rpcs)} rpcs: {', '.join(rpcs)}")
    if rpcs:
        print(f"tritonclient-only, not served (ignored): {len(theirs_only_rpcs)} rpcs: "
              f"{', '.join(theirs_only_rpcs)}")
    print(f"tritonclient-only top-level messages (ignored): {len(theirs_only_msgs)}")
    if diffs:
        print(f"MISMATCH: {len(diffs)} difference(s):")
        for d in diffs:
            print(f"  {d}")
        return 1
    print("OK: every message, field and rpc of ours is identical to tritonclient's")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
