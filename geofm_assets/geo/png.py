"""A fast PNG encoder for chip thumbnails.

Pillow filters every row of an RGB image adaptively (each of the five PNG filters tried, the
smallest kept) before deflating: about 6 ms for a 256 x 256 thumbnail at ``compress_level=1``,
half of it in the filtering. Here every row takes the "Up" filter (its difference to the row
above, one numpy subtraction for the whole image) and zlib codes it Huffman-only: about
1.6 ms, and on Sentinel-2 thumbnails smaller than Pillow's level-1 files (about 74 KB against
89 KB). Any PNG reader decodes it to the same pixels.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def fast_png(image: np.ndarray) -> bytes:
    """PNG bytes of an [H W 3] (RGB) or [H W] (grey) uint8 image."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"fast_png encodes [H W 3] or [H W] uint8 images, not {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty {height}x{width} image as PNG")
    rows = np.ascontiguousarray(image).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first is all 0
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps modulo 256, as PNG's Up does
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = deflate.compress(filtered.data) + deflate.flush()
    color_type = 2 if image.ndim == 3 else 0
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
