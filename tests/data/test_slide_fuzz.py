"""Slide fuzzing: random byte flips and truncations of a small JPEG-tiled pyramidal TIFF and of the
real SVS, opened through dfl's slide reader and `dfl tile` in a subprocess (OpenSlide is C: a crash
must not take pytest down, and is reported as such). Each mutation either reads, or gives one line
naming the slide (and the tile centre where a region read failed); never a signal, never another
exception type (issue 16, item 6)."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.helpers import FIXTURES

SVS = FIXTURES / "cmu-1-small-region.svs"
SEED, PER_FILE = 16, 10

_WORKER = """
import contextlib, io, json, sys
from dfl_tf.cli import main
from dfl_tf.data.slides import close_pooled_readers, read_views
from dfl_tf.errors import DflError

out = sys.argv[1]
for k, path in enumerate(sys.argv[2:]):
    print("@@" + json.dumps({"begin": path}), flush=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(["tile", path, "--out", f"{out}/tiles-{k}.csv", "--size", "64", "--no-thumbnails"],
                 standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = f"{type(exc).__name__}: {exc}"
    reads = []
    for centre in ((100, 100), (200, 40)):
        try:
            read_views(path, *centre, 0.5, 32, False)
            reads.append("ok")
        except DflError as exc:
            reads.append("DflError: " + str(exc))
        except BaseException as exc:
            reads.append(f"{type(exc).__name__} (not a DflError): {exc}")
        close_pooled_readers()
    print("@@" + json.dumps({"path": path, "tile": code, "stderr": err.getvalue(), "reads": reads}), flush=True)
"""


def jpeg_pyramid_tiff(path: Path, side: int = 256, tile: int = 64, levels: int = 2, mpp: float = 0.5) -> Path:
    """A tiled pyramid with JPEG tiles (Pillow-encoded: tifffile needs imagecodecs to encode JPEG),
    one top-level page per level as OpenSlide's generic-tiff driver reads it."""
    rng = np.random.default_rng(0)
    small = (rng.integers(0, 60, (side // 8, side // 8, 3)) + np.array([180, 120, 160])).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR))

    def tiles(arr: np.ndarray):
        for y in range(0, arr.shape[0], tile):
            for x in range(0, arr.shape[1], tile):
                block = np.zeros((tile, tile, 3), np.uint8)
                part = arr[y:y + tile, x:x + tile]
                block[:part.shape[0], :part.shape[1]] = part
                buf = io.BytesIO()
                Image.fromarray(block).save(buf, "JPEG", quality=80)
                yield buf.getvalue()

    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            arr = image if level == 0 else np.asarray(Image.fromarray(image).reduce(2 ** level))
            ppcm = 1e4 / (mpp * 2 ** level)
            # written as "uncompressed" bytes, then the Compression/Photometric tags are set to JPEG/YCbCr
            tw.write(tiles(arr), shape=arr.shape, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", subfiletype=1 if level else 0,
                     metadata=None)
    with tifffile.TiffFile(path) as tif:
        at = [(p.tags["Compression"].valueoffset, p.tags["PhotometricInterpretation"].valueoffset) for p in tif.pages]
    with open(path, "r+b") as fh:
        for compression, photometric in at:
            fh.seek(compression)
            fh.write((7).to_bytes(2, "little"))
            fh.seek(photometric)
            fh.write((6).to_bytes(2, "little"))
    return path


def _structure(path: Path) -> list[int]:
    """Byte positions of the IFDs and of the tag values stored outside them (offsets, counts, ...)."""
    size, where = path.stat().st_size, set()
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            where.update(range(page.offset, page.offset + 6 + 12 * len(page.tags)))
            for tag in page.tags:
                if tag.code != 270 and tag.valueoffset != tag.offset + 8:  # not the free-text description
                    where.update(range(tag.valueoffset, tag.valueoffset + min(tag.count * 8, 4096)))
    return sorted(p for p in where if p < size)


def _mutations(src: Path, out: Path, rng: random.Random) -> dict[str, str]:
    """PER_FILE mutated copies of ``src``: truncations, bit flips in the TIFF structure, byte flips anywhere."""
    data, structure, made = src.read_bytes(), _structure(src), {}
    for k in range(PER_FILE):
        blob = bytearray(data)
        if k % 3 == 0:
            cut = rng.randrange(8, len(blob))
            blob, what = blob[:cut], f"truncated at {cut}"
        elif k % 3 == 1:
            where = sorted(rng.choice(structure) for _ in range(rng.randint(1, 4)))
            for p in where:
                blob[p] ^= 1 << rng.randrange(8)
            what = f"bit flips in the TIFF structure at {where}"
        else:
            where = sorted(rng.randrange(len(blob)) for _ in range(rng.randint(1, 16)))
            for p in where:
                blob[p] ^= rng.randrange(1, 256)
            what = f"byte flips at {where}"
        path = out / f"{src.stem}-{k:02d}{src.suffix}"
        path.write_bytes(bytes(blob))
        made[str(path)] = what
    return made


def _run_all(paths: list[str], out: Path) -> tuple[dict[str, dict], list[tuple[str | None, int, str]]]:
    """Every path through the worker; a worker killed by a signal is recorded and restarted after it."""
    results: dict[str, dict] = {}
    crashes: list[tuple[str | None, int, str]] = []
    todo = list(paths)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _WORKER, str(out), *todo], capture_output=True, text=True,
                              timeout=600)
        current = None
        for line in proc.stdout.splitlines():
            if line.startswith("@@"):
                record = json.loads(line[2:])
                current = record.get("begin")
                if "path" in record:
                    results[record["path"]] = record
        if proc.returncode == 0:
            break
        crashes.append((current, proc.returncode, proc.stderr[-1000:]))
        if current is None:
            break
        todo = todo[todo.index(current) + 1:]
    return results, crashes


def test_fuzzed_slides_never_crash_and_fail_in_one_line(tmp_path):
    pyramid = jpeg_pyramid_tiff(tmp_path / "pyramid.tif")
    rng = random.Random(SEED)
    mutations = {**_mutations(pyramid, tmp_path, rng), **_mutations(SVS, tmp_path, rng)}
    results, crashes = _run_all([str(pyramid), str(SVS), *mutations], tmp_path)

    # OpenSlide or a codec dying on a mutated file would show here (returncode < 0: killed by a signal)
    assert crashes == [], [(mutations.get(p, p), code, err) for p, code, err in crashes]
    assert set(results) == {str(pyramid), str(SVS), *mutations}
    for intact in (pyramid, SVS):  # the unmutated files read
        assert results[str(intact)]["tile"] == 0 and results[str(intact)]["reads"] == ["ok", "ok"]
    failures = 0
    for path, res in results.items():
        what = mutations.get(path, "intact")
        lines = res["stderr"].strip().splitlines()
        if res["tile"] == 0:
            assert not any(line.startswith("error") for line in lines), (what, lines)
        else:  # `dfl tile`: exit 2 and one line naming the slide
            assert res["tile"] == 2 and len(lines) == 1, (what, res["tile"], lines)
            assert lines[0].startswith("error: ") and path in lines[0], (what, lines)
            failures += 1
        for message in lines + res["reads"]:  # a file OpenSlide refused: its reason, not only tifffile's codec
            assert "imagecodecs" not in message or "openslide: " in message, (what, message)
        for centre, read in zip(("(100, 100)", "(200, 40)"), res["reads"]):
            if read == "ok":
                continue
            assert read.startswith("DflError: ") and "\n" not in read and path in read, (what, read)
            assert ("cannot open slide" in read or "no microns-per-pixel" in read or "lies outside" in read
                    or f"centred at {centre}" in read), (what, read)  # a failed region read names its tile
    assert failures >= 5  # the mutations do reach the reader's error paths
