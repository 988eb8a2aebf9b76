import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.images import ImageDecodeError, decode_image, to_displayed_frame


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    pixels[:10, :5] = [255, 0, 0]  # an asymmetric marker, so every flip/rotation is visible
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"just some text, not an image\n", "not an image"),
    ],
)
def test_unusable_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_refused(picture):
    data = _encode(picture)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGB"])
def test_modes_decode_to_rgb(picture, mode):
    decoded = decode_image(_encode(picture.convert(mode)))
    assert decoded.rgb.shape == (30, 40, 3) and decoded.rgb.dtype == np.uint8
    assert decoded.format == "JPEG"


def test_png_bytes_under_a_jpg_name_decode_losslessly(picture):
    decoded = decode_image(_encode(picture, "PNG"))
    assert decoded.format == "PNG"
    np.testing.assert_array_equal(decoded.rgb, np.asarray(picture))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillows_exif_transpose(picture, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(picture, "PNG", exif=exif.tobytes())
    decoded = decode_image(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decoded.rgb, expected)
    assert decoded.orientation == orientation and decoded.stored_size == (30, 40)
    # A mask drawn on the stored pixels follows the same transform.
    marker = (np.asarray(picture)[..., 0] == 255).astype(np.uint8)
    np.testing.assert_array_equal(to_displayed_frame(marker, orientation), (expected[..., 0] == 255).astype(np.uint8))
