"""`decode_image`: what reaches the model is the image as a viewer shows it, in RGB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.images import Upload, decode_image

ORIENTATION = 0x0112  # the EXIF tag
ROTATED_90_CW = 6  # "the camera was turned": the viewer rotates the stored pixels 90 degrees clockwise


def _encoded(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, format=fmt)
    else:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def _stored() -> Image.Image:
    """40 wide, 20 high: red on the left half, blue on the right."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_exif_orientation_is_applied() -> None:
    data = _encoded(_stored(), "PNG", orientation=ROTATED_90_CW)
    got = decode_image(Upload("phone.png", data), max_pixels=10_000)
    # Turned 90 degrees clockwise: 20 wide, 40 high, the left half (red) now on top.
    assert got.shape == (40, 20, 3) and got.dtype == np.uint8
    assert (got[:20] == (255, 0, 0)).all() and (got[20:] == (0, 0, 255)).all()


def test_an_upright_image_comes_as_stored() -> None:
    got = decode_image(Upload("a.png", _encoded(_stored(), "PNG")), max_pixels=10_000)
    assert np.array_equal(got, np.asarray(_stored()))


def test_grey_and_transparent_images_come_as_rgb() -> None:
    grey = Image.fromarray(np.full((8, 8), 77, dtype=np.uint8))
    got = decode_image(Upload("grey.png", _encoded(grey, "PNG")), max_pixels=10_000)
    assert got.shape == (8, 8, 3) and (got == 77).all()
    rgba = Image.fromarray(np.full((8, 8, 4), (10, 20, 30, 128), dtype=np.uint8))
    got = decode_image(Upload("alpha.png", _encoded(rgba, "PNG")), max_pixels=10_000)
    assert got.shape == (8, 8, 3) and (got == (10, 20, 30)).all()
