"""Make the ingestion memory probe: a small zip of valid PNGs, each padded to a large size.

PNG decoders ignore bytes after the IEND chunk, so every file is a valid image, and zero
padding deflates to almost nothing: 8 files of 60 MB make a zip of about half a megabyte that
expands to 480 MB. Ingesting it measures whether ingestion holds one file or all of them:

    python benchmarks/make_padded_zip.py /tmp/padded.zip --files 8 --mb 60
    /usr/bin/time -v anole ingest /tmp/padded.zip --store /tmp/padded-store   # peak RSS
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def padded_png(seed: int, size: int) -> bytes:
    """A 105x105 grey PNG (random strokes) followed by zeros up to `size` bytes."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((105, 105)) > 0.9).astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    png = buf.getvalue()
    return png + bytes(max(0, size - len(png)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the zip to write")
    parser.add_argument("--files", type=int, default=8, help="images (two classes)")
    parser.add_argument("--mb", type=float, default=60.0, help="size of each image file, MB")
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(args.files):
            zf.writestr(f"padded/class{i % 2}/img{i:03d}.png", padded_png(i, size))
    print(f"wrote {args.out}: {args.files} PNGs of {args.mb:g} MB, "
          f"{args.out.stat().st_size / 1e6:.2f} MB zipped")


if __name__ == "__main__":
    main()
