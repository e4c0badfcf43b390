"""The one image decoder: extraction, prediction, the parity check and every serving signature
decode encoded images with these functions, so a head sees the same pixels in training and in
serving.

* JPEG: ``tf.io.decode_jpeg(channels=3, dct_method="INTEGER_ACCURATE")`` (libjpeg-turbo's
  accurate integer IDCT with fancy upsampling; ``tf.io.decode_image`` would use the fast DCT).
* PNG, GIF, BMP, WebP: ``tf.io.decode_image(channels=3, dtype=uint8, expand_animations=False)``:
  16-bit PNGs keep the high byte, palette images are expanded to RGB, alpha is dropped (not
  composited), gray is replicated to 3 channels, animations give their first frame.
* Anything else Pillow reads (TIFF incl. 16-bit gray, ...): Pillow in Python, with the same
  rules (16-bit gray keeps the high byte; ``convert("RGB")`` otherwise). These formats have no
  TF decoder, so the ``image_bytes`` serving signatures refuse them; ``serve_pixels`` takes
  their pixels decoded here.
* Pixels that are not 8-bit (:func:`to_uint8`, also used for slide regions): unsigned 16-bit
  keeps the high byte; floating point must lie in [0, 1] and becomes ``round(255 x)``; wider or
  signed integers are read as they are when every value lies in [0, 255]. Any other range (and
  NaN/inf) is refused, naming the file: guessing a scale would silently give wrong pixels.

Python callers (:func:`decode_bytes`, :func:`read_image`) run the very TF ops that the
exported graph runs (:func:`decode_tensor`), eagerly.
"""
from __future__ import annotations

import numpy as np

from dfl_tf.data.image_header import check_image_size, check_pixels, max_image_pixels
from dfl_tf.errors import DflError

#: Recorded in manifest.json / export.json: which decoding the pixels went through.
DECODER = "dfl-decode-1 (JPEG: tf decode_jpeg INTEGER_ACCURATE; PNG/GIF/BMP/WebP: tf decode_image uint8; other: Pillow)"

JPEG_MAGIC = b"\xff\xd8\xff"
#: Leading bytes of the formats the TF decoders read (WebP is RIFF....WEBP, checked apart).
TF_MAGIC = (JPEG_MAGIC, b"\x89PNG", b"GIF8", b"BM")


def tf_decodable(data: bytes) -> bool:
    """True when ``data`` starts like a format the TF decoders (and so ``image_bytes``) read."""
    head = bytes(data[:12])
    return head.startswith(TF_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _decode_jpeg(data):
    import tensorflow as tf

    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")


def _decode_other(data):
    import tensorflow as tf

    return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def decode_tensor(data):
    """Decode one encoded image (string scalar tensor) to uint8 [h, w, 3], in TF ops.

    Used inside the exported graph; :func:`decode_bytes` runs the same two ops eagerly.
    """
    import tensorflow as tf

    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)
    image = tf.cond(is_jpeg, lambda: _decode_jpeg(data), lambda: _decode_other(data))
    image.set_shape([None, None, 3])
    return image


def to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Pixels of any dtype as uint8, by the one rule (module docstring); DflError naming ``name``
    for values no fixed rule maps to 8 bits."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:  # the high byte, as the TF decoders do for 16-bit PNGs
        return (arr >> 8).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        low, high = float(np.min(arr)), float(np.max(arr))
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise DflError(f"{name}: floating-point pixels must lie in [0, 1] (found {low:g} to {high:g}); "
                           "convert the image to 8 or 16 bits")
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        low, high = int(np.min(arr)), int(np.max(arr))
        if low < 0 or high > 255:
            raise DflError(f"{name}: {arr.dtype} pixels from {low} to {high} have no fixed 8-bit scale (8-bit values "
                           "or unsigned 16-bit are read); convert the image to 8 or 16 bits")
        return arr.astype(np.uint8)
    raise DflError(f"{name}: pixels of type {arr.dtype} are not read")


def _pillow_decode(data: bytes, name: str) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img.width, img.height, name)  # Pillow has read only the header so far
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # one channel, not 8-bit: to_uint8's rule
            arr = np.asarray(img)
            if img.mode.startswith("I;16"):
                arr = arr.astype(np.uint16)
            return np.repeat(to_uint8(arr, f"image {name}")[..., None], 3, axis=-1)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_bytes(data: bytes, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB [h, w, 3] exactly as serving does.

    ``name`` (usually the file path) is named in the one-line DflError on failure.
    """
    try:
        if tf_decodable(data):
            check_image_size(data, name)  # header size within the pixel budget, before decoding
            op = _decode_jpeg if bytes(data[:3]) == JPEG_MAGIC else _decode_other
            return op(data).numpy()
        return _pillow_decode(data, name)
    except DflError:
        raise
    except Exception as exc:  # TF raises InvalidArgumentError, PIL many types, for corrupt/truncated data
        message = getattr(exc, "message", None) or str(exc)
        if type(exc).__name__ == "UnidentifiedImageError":  # its text holds a BytesIO address: not reproducible
            message = "not an image format Pillow or TensorFlow reads"
        message = " ".join(str(message).split())[:300]
        raise DflError(f"cannot read image {name}: {type(exc).__name__}: {message}") from None


def read_image(path: str) -> np.ndarray:
    """Read and decode an image file to uint8 RGB [h, w, 3]; DflError naming the file on failure."""
    try:
        with open(path, "rb") as fh:
            limit = 16 * max_image_pixels() + (1 << 20)  # 16 B/px: uncompressed 16-bit RGBA, with slack
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise DflError(f"image {path} is larger than {limit >> 20} MB, more than any image within the "
                           f"pixel budget ({max_image_pixels()} px) takes")
    except FileNotFoundError:
        raise DflError(f"image not found: {path}") from None
    except OSError as exc:
        raise DflError(f"cannot read image {path}: {exc}") from None
    return decode_bytes(data, str(path))
