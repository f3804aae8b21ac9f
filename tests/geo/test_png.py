"""The thumbnail PNG encoder: any reader decodes the same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from geofm_assets.geo.png import fast_png


@pytest.mark.parametrize("shape", [(256, 256, 3), (7, 5, 3), (1, 1, 3), (64, 33)])
def test_pixels_round_trip_through_pillow(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    image[: shape[0] // 2] = 255  # flat rows, and rows that wrap below 0 in the Up filter
    with Image.open(io.BytesIO(fast_png(image))) as decoded:
        assert decoded.mode == ("RGB" if len(shape) == 3 else "L")
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_strided_input_is_encoded_as_its_pixels() -> None:
    image = np.random.default_rng(1).integers(0, 256, (3, 40, 30)).astype(np.uint8).transpose(1, 2, 0)
    with Image.open(io.BytesIO(fast_png(image))) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_what_it_does_not_encode_is_refused() -> None:
    for bad in (np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"fast_png encodes|empty"):
            fast_png(bad)
