"""Bounded inputs: image sizes read from the header before decoding (PNG, JPEG, GIF, BMP, WebP),
a pixel budget and a batch limit in the serving graph and in Python decoding (issue 16, item 2)."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from tests.helpers.tiny import TINY_FAST
from dfl_tf import export_model, extract, load_model, predict, train_head
from dfl_tf.cli import main
from dfl_tf.data.decode import decode_bytes
from dfl_tf.data.image_header import assert_within_budget, header_sizes, image_size, pixel_budget
from dfl_tf.errors import DflError

FORMATS = [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
           ("JPEG", {"exif": b"Exif\0\0" + b"x" * 60000}),  # SOF after a 60 kB APP1 segment
           ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})]


def _encode(w: int, h: int, fmt: str, alpha: bool = False, **kw) -> bytes:
    arr = np.random.default_rng(w * h).integers(0, 255, (h, w, 4 if alpha else 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _samples() -> list[tuple[str, tuple[int, int], bytes]]:
    out = [(f"{fmt}{sorted(kw)}", (w, h), _encode(w, h, fmt, **kw)) for w, h in [(37, 53), (300, 17)]
           for fmt, kw in FORMATS]
    out.append(("WEBP alpha (VP8X)", (41, 29), _encode(41, 29, "WEBP", alpha=True)))
    return out


def test_header_sizes_python_and_graph_agree_with_the_files():
    samples = _samples()
    w, h, found = (t.numpy() for t in tf.function(header_sizes)(tf.constant([s[2] for s in samples])))
    for (name, size, data), gw, gh, ok in zip(samples, w, h, found):
        assert image_size(data) == size, name
        assert ok and (gw, gh) == size, name


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0\0\0\0IDAT" + b"\0" * 64


def _bombs() -> dict[str, bytes]:
    jpeg = bytearray(_encode(16, 16, "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    gif = bytearray(_encode(16, 16, "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    bmp = bytearray(_encode(16, 16, "BMP"))
    bmp[18:26] = struct.pack("<ii", 30000, -30000)
    webp = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\0" * 4 + \
        (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little") + b"\0" * 16
    return {"png": _png_header(20000, 20000), "jpeg": bytes(jpeg), "gif": bytes(gif), "bmp": bytes(bmp),
            "webp": webp}


@pytest.mark.parametrize("kind", ["png", "jpeg", "gif", "bmp", "webp"])
def test_huge_declared_sizes_refused_before_decoding(kind):
    data = _bombs()[kind]
    t0 = time.time()
    with pytest.raises(DflError, match=rf"image bomb\.{kind} is \d+ x \d+ = \d+ px, over the limit of 16777216 px"):
        decode_bytes(data, f"bomb.{kind}")
    assert time.time() - t0 < 1.0
    good = _encode(20, 20, "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"over the pixel budget .* batch positions\] \[1 3\]"):
        _graph_check(tf.constant([good, data, good, data]))


@tf.function
def _graph_check(data):
    with tf.control_dependencies(assert_within_budget(data, "image_bytes", 4096 * 4096)):
        return tf.identity(data)


def test_pillow_only_formats_and_the_budget_context(tmp_path):
    tiff = _encode(64, 64, "TIFF")
    assert decode_bytes(tiff, "a.tif").shape == (64, 64, 3)
    with pixel_budget(32 * 32):
        with pytest.raises(DflError, match=r"image a.tif is 64 x 64 = 4096 px, over the limit of 1024 px"):
            decode_bytes(tiff, "a.tif")
        with pytest.raises(DflError, match="over the limit of 1024 px"):
            decode_bytes(_encode(64, 64, "PNG"), "b.png")


def test_fuzzed_headers_never_crash_and_both_parsers_agree():
    rng = np.random.default_rng(5)
    seeds = [s[2] for s in _samples()] + list(_bombs().values())
    mutants = []
    for trial in range(240):
        data = bytearray(seeds[trial % len(seeds)][:200])
        if trial % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        mutants.append(bytes(data))
    w, h, found = (t.numpy() for t in tf.function(header_sizes)(tf.constant(mutants)))
    for data, gw, gh, ok in zip(mutants, w, h, found):
        size = image_size(data)
        assert (size is not None) == bool(ok), data[:40]
        if size is not None:
            assert size == (gw, gh)


# -- the exported graph ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("budget")
    from tests.helpers.tiny import write_images

    images = write_images(root / "imgs", per_class=3, size=(40, 40))
    extract(images, root / "emb", **TINY_FAST)
    train_head(root / "emb", root / "head", epochs=1, batch_size=8, progress=False)
    info = export_model([root / "head"], root / "saved_models" / "m", max_image_pixels=48 * 48, max_batch=3)
    return {"root": root, "images": images, "info": info, "model": load_model(info["path"])}


def test_export_records_and_enforces_the_bounds(small_export):
    info, model = small_export["info"], small_export["model"]
    assert info["max_image_pixels"] == 48 * 48 and info["max_batch"] == 3
    ok, big = _encode(40, 40, "PNG"), _encode(60, 60, "JPEG")
    assert model([ok, ok])["head_probabilities"].shape == (2, 2)
    t0 = time.time()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes: images over the pixel budget of 2304 px"
                                                             r" .*batch positions\] \[1\]"):
        model([ok, big, ok])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"batch positions\] \[0\]"):
        model([_bombs()["png"]])  # 20000 x 20000: refused without allocating 1.2 GB
    assert time.time() - t0 < 5.0
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes: batch of\] \[4\] \[images is over --max-batch 3"):
        model([ok] * 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images: images of\] \[60\] \[x\] \[60\] \[px are over"):
        model.predict_pixels(np.zeros((1, 60, 60, 3), np.uint8))


def test_predict_uses_the_exports_budget(small_export, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "small.png").write_bytes(_encode(40, 40, "PNG"))
    (folder / "large.png").write_bytes(_encode(60, 60, "PNG"))
    with pytest.raises(DflError, match=r"large.png is 60 x 60 = 3600 px, over the limit of 2304 px"):
        predict(small_export["model"], folder, tmp_path / "p.csv", progress=False)
    summary = predict(small_export["model"], folder, tmp_path / "p.csv", skip_bad=True, progress=False)
    assert summary["predicted"] == 1 and "over the limit" in summary["skipped"][0]["error"]


def test_export_cli_refuses_bad_bounds(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--out", str(tmp_path / "m"),
                                       "--max-image-pixels", "0"])
    assert result.exit_code == 2
    assert "error: --max-image-pixels must be at least 1 (got 0)" in result.output


def test_two_exports_at_once_never_share_a_version(small_export):
    """(Issue 16, item 4.) The export lock spans choosing the version and writing it."""
    import threading

    root, out = small_export["root"], small_export["root"] / "saved_models" / "race"
    results: list = []
    start = threading.Barrier(2)

    def run():
        start.wait()
        try:
            results.append(export_model([root / "head"], out, parity_samples=0)["version"])
        except DflError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = [r for r in results if isinstance(r, int)]
    assert versions and len(set(versions)) == len(versions)
    assert all(isinstance(r, int) or "is in use by another dfl export" in r for r in results)
    assert sorted(int(p.name) for p in out.iterdir() if p.name.isdigit()) == sorted(versions)


def test_oversized_file_is_not_read_whole(tmp_path):
    from dfl_tf.data.decode import read_image

    path = tmp_path / "huge.bmp"
    with open(path, "wb") as fh:
        fh.write(_encode(8, 8, "BMP"))
        fh.truncate(16 * 32 * 32 + (1 << 20) + 10)  # sparse: larger than any 32 x 32 image can be
    with pixel_budget(32 * 32), pytest.raises(DflError, match=r"image .*huge.bmp is larger than 1 MB"):
        read_image(str(path))
