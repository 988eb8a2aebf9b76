"""Image decoding that survives what real datasets contain, and says why when it cannot.

COCO-style folders hold grayscale and CMYK JPEGs, EXIF-rotated phone photos, PNG bytes under a
``.jpg`` name, truncated downloads and zero-byte files. Decoding returns RGB uint8 pixels in the
*displayed* orientation (what a person sees, and the frame the annotations are drawn in); every
failure is an :class:`ImageDecodeError` whose message is the reason written to ``failures.jsonl``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.errors import SvpError

# A truncated file must fail loudly, never decode as a grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ORIENTATION_TAG = 0x0112
# EXIF orientation → the PIL transpose that shows the image upright (as ImageOps.exif_transpose does).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(SvpError, ValueError):
    """The bytes are not a usable image; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    """RGB pixels as displayed, plus what is needed to map masks drawn in the stored frame."""

    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied
    stored_size: tuple[int, int]  # (height, width) of the pixels as stored in the file
    orientation: int  # EXIF orientation tag (1 = as stored)
    format: str  # what the bytes really are (JPEG, PNG, ...), whatever the file name says

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def decode_image(data: bytes) -> DecodedImage:
    """Decode image bytes to displayed-orientation RGB; raise :class:`ImageDecodeError` with a reason."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image: unrecognised content ({len(data)} bytes, starts {data[:8]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    orientation = _orientation(image)
    stored_size = (image.height, image.width)
    fmt = image.format or "unknown"
    if orientation in _EXIF_TRANSPOSE:
        image = image.transpose(_EXIF_TRANSPOSE[orientation])
    return DecodedImage(rgb=_to_rgb(image), stored_size=stored_size, orientation=orientation, format=fmt)


def to_displayed_frame(mask: np.ndarray, orientation: int) -> np.ndarray:
    """Apply the same EXIF transpose to a mask drawn on the stored pixels."""
    if orientation not in _EXIF_TRANSPOSE:
        return mask
    return np.asarray(Image.fromarray(mask).transpose(_EXIF_TRANSPOSE[orientation]))


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not cost the pixels: treat as upright
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode → RGB uint8. CMYK goes through PIL's conversion; alpha is composited on white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "I;16" or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(float(array.max()), 1.0)
        image = Image.fromarray((array * scale).astype(np.uint8))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
