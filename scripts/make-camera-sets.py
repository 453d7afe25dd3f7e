#!/usr/bin/env python3
"""Make camera-size JPEG versions of a raw 32x32 image set.

Reads a raw set in the shared/data format (``NAME.u8`` = N*H*W*C unsigned bytes,
NHWC, RGB or gray, described by ``NAME.json``; optional ``NAME.labels.u8``) and
writes every image upscaled with a bicubic filter to a camera frame size
(e.g. 640x480 or 1920x1080), JPEG-encoded.

Output (default ``--format pack``) is the same pack format as
``shared/data/cifar10_train.jpgpack``:

* ``OUT/NAME.jpgpack``      the JPEG files concatenated, unchanged
* ``OUT/NAME.offsets.u64``  N+1 little-endian u64 byte offsets; image i is
                            ``pack[off[i]:off[i+1]]``
* ``OUT/NAME.labels.u8``    one class id per image (only if the source has labels)
* ``OUT/NAME.json``         what was made, and from what

``--format files`` writes ``OUT/NAME/000000.jpg ...`` (+ labels/json) instead.

Aspect ratio: the default ``--fit stretch`` scales the square source to fill the
whole frame (non-uniformly). It is the default because the sidecar resizes a
frame straight back to the model's 32x32 input without cropping or padding, so a
stretched frame round-trips to (approximately) the original image, and camera
decode/resize fidelity can be compared against the un-stretched source.
``--fit pad`` keeps the aspect ratio and pads left/right with black (letterbox);
it shows what a real 16:9 camera does to a square subject, but the model then
sees black bars it was never trained on.

``--mosaic TILE`` instead fills each frame with a grid of consecutive source
images, each upscaled to TILE x TILE pixels (partial tiles at the right/bottom
edges are cropped). Such frames have the entropy of real camera footage (a
1080p q85 4:2:0 mosaic with TILE=64 is a few hundred KB) and are what decode
benchmarks should use; they carry no labels.

Output belongs in a git-ignored cache dir (default ``.cache/camera``); never
commit it.

Example::

    scripts/make-camera-sets.py --src ../shared/data/cifar10_test.u8 --size 1920x1080 \\
        --quality 85 --out .cache/camera

``scripts/make-camera-sets.sh`` makes the four sets of the README's fidelity
table this way (in a venv it creates with the pinned Pillow and numpy of
``scripts/requirements-camera.txt``). The sidecar reads the packs directly:
``eval --id .cache/camera/cifar10_test_1920x1080_q85.jpgpack``, ``detect``,
``calibrate``.

Needs Pillow (with its bundled libjpeg-turbo) and numpy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, got {text!r}")
    if not (1 <= w <= 16384 and 1 <= h <= 16384):
        raise argparse.ArgumentTypeError(f"size out of range: {text!r}")
    return w, h


def strip_u8(path: Path) -> Path:
    """``dir/NAME.u8`` -> ``dir/NAME`` (the stem shared by the sidecar files)."""
    return path.with_suffix("") if path.suffix == ".u8" else path


def load_raw(src: Path, shape: str | None, first: int | None):
    """Returns (pixels N*H*W*C uint8 memmap, labels or None, meta dict)."""
    base = strip_u8(src)
    meta_path = base.with_suffix(".json")
    if shape:
        h, w, c = (int(v) for v in shape.lower().split("x"))
        meta = {}
    elif meta_path.exists():
        meta = json.loads(meta_path.read_text())
        h, w, c = int(meta["h"]), int(meta["w"]), int(meta["c"])
    else:
        sys.exit(f"{meta_path} not found; pass --shape HxWxC")
    if c not in (1, 3):
        sys.exit(f"only 1 or 3 channels are supported, got {c}")
    per_image = h * w * c
    size = src.stat().st_size
    if size % per_image:
        sys.exit(f"{src}: {size} bytes is not a multiple of {h}x{w}x{c}")
    n = size // per_image
    if first is not None:
        n = min(n, first)
    pixels = np.memmap(src, dtype=np.uint8, mode="r", shape=(size // per_image, h, w, c))[:n]
    labels_path = Path(str(base) + ".labels.u8")
    labels = None
    if labels_path.exists():
        labels = np.fromfile(labels_path, dtype=np.uint8)[:n]
        if len(labels) != n:
            sys.exit(f"{labels_path}: {len(labels)} labels for {n} images")
    return pixels, labels, meta


def to_pil(img: np.ndarray) -> Image.Image:
    if img.shape[2] == 1:
        return Image.fromarray(img[:, :, 0], mode="L").convert("RGB")
    return Image.fromarray(img, mode="RGB")


def upscale(img: np.ndarray, size: tuple[int, int], fit: str) -> Image.Image:
    w, h = size
    src = to_pil(img)
    if fit == "stretch":
        return src.resize((w, h), Image.Resampling.BICUBIC)
    # pad: largest aspect-preserving fit, centred on black
    sw, sh = src.size
    scale = min(w / sw, h / sh)
    iw, ih = max(1, round(sw * scale)), max(1, round(sh * scale))
    frame = Image.new("RGB", (w, h))
    frame.paste(src.resize((iw, ih), Image.Resampling.BICUBIC), ((w - iw) // 2, (h - ih) // 2))
    return frame


def mosaic(pixels: np.ndarray, start: int, size: tuple[int, int], tile: int) -> tuple[Image.Image, int]:
    """One frame filled with consecutive images from `start` (wrapping); returns (frame, next start)."""
    w, h = size
    cols, rows = -(-w // tile), -(-h // tile)
    frame = Image.new("RGB", (cols * tile, rows * tile))
    i = start
    for r in range(rows):
        for c in range(cols):
            frame.paste(to_pil(pixels[i % len(pixels)]).resize((tile, tile), Image.Resampling.BICUBIC),
                        (c * tile, r * tile))
            i += 1
    return frame.crop((0, 0, w, h)), i % len(pixels)


def encode(frame: Image.Image, quality: int, subsampling: str) -> bytes:
    buf = io.BytesIO()
    frame.save(buf, format="JPEG", quality=quality, subsampling=SUBSAMPLING[subsampling], optimize=False)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, required=True, help="raw NAME.u8 (NHWC u8, with NAME.json beside it)")
    p.add_argument("--size", type=parse_size, required=True, help="frame size WxH, e.g. 1920x1080")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality 1..100 (default 85)")
    p.add_argument("--subsampling", choices=sorted(SUBSAMPLING), default="4:2:0",
                   help="JPEG chroma subsampling (default 4:2:0, what cameras and libjpeg emit)")
    p.add_argument("--first", type=int, default=None, help="only the first N source images (mosaic: N frames)")
    p.add_argument("--fit", choices=("stretch", "pad"), default="stretch", help="aspect handling (default stretch)")
    p.add_argument("--mosaic", type=int, default=None, metavar="TILE",
                   help="make benchmark frames: grids of source images upscaled to TILE x TILE")
    p.add_argument("--shape", default=None, help="HxWxC when NAME.json is missing")
    p.add_argument("--format", choices=("pack", "files"), default="pack")
    p.add_argument("--name", default=None, help="output name (default SRCNAME_WxH_qQ[_mosaicTILE])")
    p.add_argument("--out", type=Path, default=Path(".cache/camera"), help="output dir (git-ignored cache)")
    args = p.parse_args(argv)
    if not 1 <= args.quality <= 100:
        p.error("--quality must be 1..100")
    if args.mosaic is not None and args.mosaic < 1:
        p.error("--mosaic must be >= 1")

    pixels, labels, src_meta = load_raw(args.src, args.shape, None if args.mosaic else args.first)
    w, h = args.size
    stem = strip_u8(args.src).name
    name = args.name or f"{stem}_{w}x{h}_q{args.quality}" + (f"_mosaic{args.mosaic}" if args.mosaic else "")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.mosaic:
        n = args.first if args.first is not None else 16
        labels = None
    else:
        n = len(pixels)

    files_dir = args.out / name
    if args.format == "files":
        files_dir.mkdir(exist_ok=True)
    offsets = [0]
    pack_path = args.out / f"{name}.jpgpack"
    tmp_pack = pack_path.with_suffix(".jpgpack.tmp")
    start = 0
    with (open(tmp_pack, "wb") if args.format == "pack" else open(os.devnull, "wb")) as pack:
        for i in range(n):
            if args.mosaic:
                frame, start = mosaic(pixels, start, (w, h), args.mosaic)
            else:
                frame = upscale(pixels[i], (w, h), args.fit)
            data = encode(frame, args.quality, args.subsampling)
            if args.format == "pack":
                pack.write(data)
            else:
                (files_dir / f"{i:06d}.jpg").write_bytes(data)
            offsets.append(offsets[-1] + len(data))
    if args.format == "pack":
        os.replace(tmp_pack, pack_path)
        np.asarray(offsets, dtype="<u8").tofile(args.out / f"{name}.offsets.u64")
    if labels is not None:
        labels.astype(np.uint8).tofile(args.out / f"{name}.labels.u8")
    meta = {
        "n": n,
        "format": "jpgpack" if args.format == "pack" else "jpeg files",
        "w": w,
        "h": h,
        "c": 3,
        "quality": args.quality,
        "subsampling": args.subsampling,
        "resample": "bicubic (Pillow)",
        "fit": "mosaic" if args.mosaic else args.fit,
        "mosaic_tile": args.mosaic,
        "source": str(args.src),
        "source_first": n if not args.mosaic else None,
        "has_labels": labels is not None,
        "label_names": src_meta.get("label_names"),
        "bytes_total": offsets[-1],
        "bytes_mean": offsets[-1] / max(n, 1),
        "made_by": "scripts/make-camera-sets.py",
    }
    (args.out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: {n} frames {w}x{h} q{args.quality} {args.subsampling}, "
          f"{offsets[-1] / max(n, 1) / 1024:.1f} KiB mean -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
