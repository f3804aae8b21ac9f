import numpy as np

from geofm_assets.geo.mosaic import harmonize_offset, upsample2x_bilinear, upsample_nearest


def test_bilinear_upsampling_is_exact_on_a_linear_ramp():
    # a ramp sampled at 20 m pixel centres, upsampled to 10 m centres, stays the ramp
    src = np.arange(8, dtype=np.float32)[None, :].repeat(6, axis=0) * 20 + 1000  # [6 8]
    up = upsample2x_bilinear(src)  # [8 12], halo of one source pixel dropped
    expected_cols = 1000 + 20 * (np.arange(12) / 2 + 0.75)  # 10 m centres in source units
    np.testing.assert_allclose(up[0], expected_cols, rtol=0, atol=1e-3)
    assert up.shape == (8, 12)


def test_nearest_upsampling_repeats_pixels():
    a = np.array([[1, 2], [3, 4]], np.uint16)
    np.testing.assert_array_equal(upsample_nearest(a, 2)[:, :2], [[1, 1], [1, 1], [3, 3], [3, 3]])


def test_harmonize_offset_removes_1000_and_keeps_nodata():
    dn = np.array([0, 1000, 1001, 1500, 65535], np.uint16)
    out = harmonize_offset(dn, 1000)
    np.testing.assert_array_equal(out, [0, 1, 1, 500, 64535])
    assert harmonize_offset(dn, 0) is dn
