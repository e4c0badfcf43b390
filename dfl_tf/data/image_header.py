"""Image sizes read from headers before any decoding, and the pixel budget they are held to.

A 1 MB PNG can declare 20000 x 20000 pixels (1.2 GB decoded): every decoder allocates what the
header says. So the size is read first, from the header alone: PNG IHDR, JPEG SOF (walking
the marker segments), GIF logical screen, BMP DIB header, WebP VP8/VP8L/VP8X. Two versions of
the same parser: :func:`image_size` in Python (extraction, prediction) and
:func:`header_sizes` in TF ops (the exported serving graph, so TF Serving refuses a bomb
before it allocates anything). An image over the budget, or whose header gives no size, is
refused with its name or batch position.

The budget: ``DEFAULT_MAX_PIXELS`` = 4096 x 4096 (16.8 Mpx, 50 MB as uint8 RGB; patches and
context images are far smaller). ``dfl export --max-image-pixels`` sets it in the graph (and
``export.json``); extraction and ``dfl predict`` use ``$DFL_TF_MAX_IMAGE_PIXELS`` or the default
(predict: the export's value).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from dfl_tf.errors import DflError

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BATCH = 64  # = max_batch_size of saved_models/batching.config
ENV = "DFL_TF_MAX_IMAGE_PIXELS"
_JPEG_SCAN_LIMIT = 1 << 16  # marker segments walked before a JPEG's SOF (real files: < 100)
_override: list[int] = []


def max_image_pixels() -> int:
    """The pixel budget for decoding in Python: a :func:`pixel_budget` block, else
    ``$DFL_TF_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    if _override:
        return _override[-1]
    value = os.environ.get(ENV)
    if value:
        try:
            if int(value) > 0:
                return int(value)
        except ValueError:
            pass
        raise DflError(f"${ENV} must be a positive number of pixels, got {value!r}")
    return DEFAULT_MAX_PIXELS


@contextlib.contextmanager
def pixel_budget(pixels: int | None) -> Iterator[None]:
    """Use ``pixels`` as the Python-side budget (process-wide) inside the block."""
    if pixels is None:
        yield
        return
    _override.append(int(pixels))
    try:
        yield
    finally:
        _override.pop()


# -- Python --------------------------------------------------------------------------------

def _be(b: bytes, i: int, n: int) -> int:
    return int.from_bytes(b[i:i + n], "big")


def _le(b: bytes, i: int, n: int) -> int:
    return int.from_bytes(b[i:i + n], "little")


def _is_sof(marker: int) -> bool:
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF, BMP or WebP; None if not found."""
    b = bytes(data[:64])
    if b.startswith(b"\x89PNG\r\n\x1a\n") and b[12:16] == b"IHDR" and len(b) >= 24:
        return _be(b, 16, 4), _be(b, 20, 4)
    if b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        return _le(b, 6, 2), _le(b, 8, 2)
    if b[:2] == b"BM" and len(b) >= 26:
        if _le(b, 14, 4) == 12:  # OS/2 BITMAPCOREHEADER
            return _le(b, 18, 2), _le(b, 20, 2)
        w = int.from_bytes(b[18:22], "little", signed=True)
        h = int.from_bytes(b[22:26], "little", signed=True)
        return abs(w), abs(h)
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP" and len(b) >= 30:
        chunk = b[12:16]
        if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
            return _le(b, 26, 2) & 0x3FFF, _le(b, 28, 2) & 0x3FFF
        if chunk == b"VP8L" and b[20] == 0x2F:
            b0, b1, b2, b3 = b[21:25]
            return 1 + (((b1 & 0x3F) << 8) | b0), 1 + (((b3 & 0x0F) << 10) | (b2 << 2) | ((b1 & 0xC0) >> 6))
        if chunk == b"VP8X":
            return 1 + _le(b, 24, 3), 1 + _le(b, 27, 3)
        return None
    if bytes(data[:3]) == b"\xff\xd8\xff":
        pos, n = 2, len(data)
        for _ in range(_JPEG_SCAN_LIMIT):
            if pos + 9 > n or data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:
                pos += 1  # fill byte
            elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
                pos += 2  # standalone markers
            elif marker in (0xD9, 0xDA):
                return None  # end of image / start of scan before any frame header
            elif _is_sof(marker):
                return _be(data, pos + 7, 2), _be(data, pos + 5, 2)
            else:
                length = _be(data, pos + 2, 2)
                if length < 2:
                    return None
                pos += 2 + length
    return None


def check_image_size(data: bytes, name: str, max_pixels: int | None = None) -> None:
    """DflError naming ``name`` when the header gives no size or one over the budget."""
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    size = image_size(data)
    if size is None:
        raise DflError(f"cannot read image {name}: no image size found in its header (corrupt or truncated)")
    check_pixels(size[0], size[1], name, limit)


def check_pixels(width: int, height: int, name: str, max_pixels: int | None = None) -> None:
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise DflError(f"image {name} is {width} x {height} = {width * height} px, over the limit of {limit} px "
                       f"(refused before decoding; raise it with ${ENV})")


# -- TF ops (the serving graph) -------------------------------------------------------------

def _size_tensor(data):
    """(width, height, found) int64/int64/bool for one encoded image (string scalar)."""
    import tensorflow as tf

    padded = tf.strings.join([data, tf.constant(b"\0" * 32)])  # fixed offsets never run past the end

    def raw(offset, n):
        return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, n), tf.uint8), tf.int64)

    def be(offset, n):
        v = raw(offset, n)
        return tf.reduce_sum(v * tf.constant([256 ** (n - 1 - i) for i in range(n)], tf.int64))

    def le(offset, n):
        v = raw(offset, n)
        return tf.reduce_sum(v * tf.constant([256 ** i for i in range(n)], tf.int64))

    def band(v, mask):
        return tf.bitwise.bitwise_and(v, tf.constant(mask, tf.int64))

    def signed32(v):
        return tf.abs(tf.where(v >= 2 ** 31, v - 2 ** 32, v))

    head = lambda offset, n: tf.strings.substr(padded, offset, n)  # noqa: E731
    zero, no = tf.constant(0, tf.int64), tf.constant(False)
    length = tf.strings.length(data)  # the fields must lie inside the data, as in image_size()

    def png():
        ok = tf.equal(head(12, 4), b"IHDR") & (length >= 24)
        return be(16, 4), be(20, 4), ok

    def gif():
        return le(6, 2), le(8, 2), length >= 10

    def bmp():
        core = tf.equal(le(14, 4), 12)
        w = tf.where(core, le(18, 2), signed32(le(18, 4)))
        h = tf.where(core, le(20, 2), signed32(le(22, 4)))
        return w, h, length >= 26

    def webp():
        chunk = head(12, 4)
        vp8 = tf.equal(chunk, b"VP8 ") & tf.equal(head(23, 3), b"\x9d\x01\x2a")
        vp8l = tf.equal(chunk, b"VP8L") & tf.equal(head(20, 1), b"\x2f")
        vp8x = tf.equal(chunk, b"VP8X")
        b = raw(21, 4)
        lw = 1 + band(b[1], 0x3F) * 256 + b[0]
        lh = 1 + band(b[3], 0x0F) * 1024 + b[2] * 4 + band(b[1], 0xC0) // 64
        w = tf.where(vp8, band(le(26, 2), 0x3FFF), tf.where(vp8l, lw, 1 + le(24, 3)))
        h = tf.where(vp8, band(le(28, 2), 0x3FFF), tf.where(vp8l, lh, 1 + le(27, 3)))
        return w, h, (vp8 | vp8l | vp8x) & (length >= 30)

    def jpeg():
        return _jpeg_size_tensor(padded, tf.cast(length, tf.int64))

    magic = head(0, 8)
    is_png = tf.equal(magic, b"\x89PNG\r\n\x1a\n")
    is_gif = tf.equal(head(0, 6), b"GIF87a") | tf.equal(head(0, 6), b"GIF89a")
    is_bmp = tf.equal(head(0, 2), b"BM")
    is_webp = tf.equal(head(0, 4), b"RIFF") & tf.equal(head(8, 4), b"WEBP")
    is_jpeg = tf.equal(head(0, 3), b"\xff\xd8\xff")
    branch = tf.where(is_png, 0, tf.where(is_gif, 1, tf.where(is_bmp, 2, tf.where(is_webp, 3,
                                                                                  tf.where(is_jpeg, 4, 5)))))
    return tf.switch_case(branch, [png, gif, bmp, webp, jpeg, lambda: (zero, zero, no)])


def _jpeg_size_tensor(padded, n):
    """(width, height, found) of a JPEG: its markers walked up to the first SOF (``padded``: the
    data and 32 zero bytes; ``n``: the data's length, int64)."""
    import tensorflow as tf

    b = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
    zero, no = tf.constant(0, tf.int64), tf.constant(False)
    last = tf.size(b, out_type=tf.int64) - 1

    def at(i):
        return tf.gather(b, tf.minimum(i, last))  # past the end reads padding, never out of range

    def cond(pos, w, h, found, done):
        return tf.logical_not(done)

    def body(pos, w, h, found, done):
        short = pos + 9 > n
        lead_ok = tf.equal(at(pos), 0xFF)
        marker = at(pos + 1)
        fill = tf.equal(marker, 0xFF)
        standalone = tf.equal(marker, 0x01) | ((marker >= 0xD0) & (marker <= 0xD8))
        stop = tf.equal(marker, 0xD9) | tf.equal(marker, 0xDA)
        sof = (marker >= 0xC0) & (marker <= 0xCF) & tf.not_equal(marker, 0xC4) & \
            tf.not_equal(marker, 0xC8) & tf.not_equal(marker, 0xCC)
        length = at(pos + 2) * 256 + at(pos + 3)
        bad = short | tf.logical_not(lead_ok) | stop | \
            (tf.logical_not(fill | standalone | sof) & (length < 2))
        hit = tf.logical_not(bad) & tf.logical_not(fill) & tf.logical_not(standalone) & sof
        new_w = tf.where(hit, at(pos + 7) * 256 + at(pos + 8), w)
        new_h = tf.where(hit, at(pos + 5) * 256 + at(pos + 6), h)
        step = tf.where(fill, tf.constant(1, tf.int64), tf.where(standalone, tf.constant(2, tf.int64), 2 + length))
        return pos + step, new_w, new_h, hit, bad | hit

    _, w, h, found, _ = tf.while_loop(cond, body, (tf.constant(2, tf.int64), zero, zero, no, no),
                                      maximum_iterations=_JPEG_SCAN_LIMIT)
    return w, h, found


def header_sizes(data):
    """Per image of a string [N] tensor: width, height (int64 [N]) and found (bool [N])."""
    import tensorflow as tf

    return tf.map_fn(_size_tensor, data, fn_output_signature=(tf.int64, tf.int64, tf.bool))


def assert_within_budget(data, name: str, max_pixels: int, max_batch: int | None = None) -> list:
    """Graph assertions: batch size, then every image's header size, refused with batch positions."""
    import tensorflow as tf

    checks = []
    if max_batch is not None:
        checks.append(tf.debugging.Assert(
            tf.size(data) <= max_batch, [f"{name}: batch of", tf.size(data), f"images is over --max-batch {max_batch}"]))
    with tf.control_dependencies(checks):
        w, h, found = header_sizes(data)
    unreadable = tf.reshape(tf.where(tf.logical_not(found)), [-1])
    over = tf.reshape(tf.where(found & (w * h > max_pixels)), [-1])
    checks.append(tf.debugging.Assert(tf.equal(tf.size(unreadable), 0), [
        f"{name}: no image size in the header (corrupt or truncated) at batch positions", unreadable], summarize=20))
    checks.append(tf.debugging.Assert(tf.equal(tf.size(over), 0), [
        f"{name}: images over the pixel budget of {max_pixels} px (--max-image-pixels) at batch positions", over,
        "widths", tf.gather(w, over), "heights", tf.gather(h, over)], summarize=20))
    return checks


def assert_pixels_within_budget(images, name: str, max_pixels: int, max_batch: int | None = None) -> list:
    """The same limits for a uint8 [N, H, W, 3] pixel batch (``serve_pixels``)."""
    import tensorflow as tf

    shape = tf.shape(images, out_type=tf.int64)
    checks = [tf.debugging.Assert(shape[1] * shape[2] <= max_pixels, [
        f"{name}: images of", shape[2], "x", shape[1], f"px are over the pixel budget of {max_pixels} px"])]
    if max_batch is not None:
        checks.append(tf.debugging.Assert(shape[0] <= max_batch, [
            f"{name}: batch of", shape[0], f"images is over --max-batch {max_batch}"]))
    return checks


_PNG_CHUNK_LIMIT = 1 << 16  # chunks walked per PNG; past it the file is taken as complete


def _png_chunks_complete(data):
    """False for a PNG (string scalar) whose chunks run past the end of the data before its IEND
    chunk (truncated); True otherwise, or when the walk hits its limit."""
    import tensorflow as tf

    n = tf.cast(tf.strings.length(data), tf.int64)
    padded = tf.strings.join([data, tf.constant(b"\0" * 8)])

    def cond(pos, done, ok):
        return tf.logical_not(done)

    def body(pos, done, ok):
        inside = pos + 12 <= n  # a chunk is at least length (4) + type (4) + CRC (4) bytes
        head = tf.strings.substr(padded, tf.minimum(pos, n), 8)
        length = tf.reduce_sum(tf.cast(tf.io.decode_raw(tf.strings.substr(head, 0, 4), tf.uint8), tf.int64)
                               * tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64))
        fits = inside & (pos + 12 + length <= n)
        end = fits & tf.equal(tf.strings.substr(head, 4, 4), b"IEND")
        return pos + 12 + length, end | tf.logical_not(fits), end

    _, done, ok = tf.while_loop(cond, body, (tf.constant(8, tf.int64), tf.constant(False), tf.constant(False)),
                                maximum_iterations=_PNG_CHUNK_LIMIT)
    return ok | tf.logical_not(done)  # the limit reached: not judged


def truncated_pngs(data):
    """Bool [N] for a string [N] tensor: PNGs cut short (no IEND chunk inside the data). A PNG that
    ends with its IEND chunk (the usual case) costs one comparison; only the others are walked."""
    import tensorflow as tf

    n = tf.strings.length(data)  # substr cuts at the end; only its start must lie inside the data
    is_png = tf.equal(tf.strings.substr(data, tf.zeros_like(n), tf.fill(tf.shape(n), 8)), b"\x89PNG\r\n\x1a\n")
    tail = tf.strings.substr(data, tf.maximum(n - 12, 0), tf.fill(tf.shape(n), 12))
    walk = is_png & tf.not_equal(tail, b"\0\0\0\0IEND\xaeB`\x82")  # IEND with its fixed CRC
    where = tf.reshape(tf.where(walk), [-1])
    complete = tf.map_fn(_png_chunks_complete, tf.gather(data, where), fn_output_signature=tf.bool)
    return tf.scatter_nd(tf.expand_dims(where, 1), tf.logical_not(complete), tf.shape(data, out_type=tf.int64))


def assert_complete(data, name: str) -> list:
    """Graph assertion: PNGs cut short (no IEND chunk inside the data) refused with batch positions,
    before the decoder fails without saying which image."""
    import tensorflow as tf

    cut = tf.reshape(tf.where(truncated_pngs(data)), [-1])
    return [tf.debugging.Assert(tf.equal(tf.size(cut), 0), [
        f"{name}: truncated PNG (its chunks end before IEND) at batch positions", cut], summarize=20)]
