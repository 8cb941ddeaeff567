"""Uploaded images for /predict: their header read and checked, their pixels decoded, with PIL.

The API reads every upload's header first (`open_image`: only `IMAGE_FORMATS` are opened, and the
size is checked against the limits before anything is decoded: a few MB of PNG can decode to
gigabytes). The inference process decodes (`decode_image`): the encoded file crosses to it, not the
pixels (a 1920x1080 photo is 6 MB of pixels against a few hundred kB of JPEG), and a decoder that
crashes takes down the process that is restarted on demand, not the API. Every error names its file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.datasets.pipeline import TRAINABLE_FORMATS
from app.errors import AppError, InvalidInput, UnsupportedMediaType

# The PIL formats /predict opens: those the service trains on. Any other is never handed to a decoder.
# MPO (a phone camera's JPEG) is opened by PIL's JPEG opener, which has no opener of its own.
IMAGE_FORMATS: tuple[str, ...] = tuple(sorted(TRAINABLE_FORMATS - {"MPO"}))
IMAGE_FORMATS_TEXT = ", ".join(IMAGE_FORMATS)


@dataclass(frozen=True)
class Upload:
    """One uploaded file, read into memory (the request size limit bounds it)."""

    name: str
    data: bytes


def open_image(upload: Upload, *, max_pixels: int) -> Any:
    """`upload` opened by PIL, its header read but nothing decoded; 415 for a format not in
    IMAGE_FORMATS, 422 for an image over `max_pixels` or a header that does not parse."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit raises) for big images; our limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(upload.data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            f"{upload.name}: not an image in a format the service reads ({IMAGE_FORMATS_TEXT})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{upload.name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{upload.name}: the image header cannot be read ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InvalidInput(
            f"{upload.name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels} "
            "(SGJOBS_PREDICT_MAX_IMAGE_PIXELS)"
        )
    return image


def decode_image(upload: Upload, *, max_pixels: int) -> np.ndarray:
    """HWC RGB uint8 pixels of `upload`, EXIF orientation applied.

    415 when the bytes are not an image in one of IMAGE_FORMATS; 422 when the image is over the pixel
    limit (checked from the header, before decoding) or cannot be decoded (truncated, corrupt).
    """
    from PIL import Image, ImageOps

    with open_image(upload, max_pixels=max_pixels) as image:
        try:
            image.load()  # decodes: a truncated or corrupt file fails here
            # In place, and converted only when not RGB already: each would otherwise copy the pixels.
            ImageOps.exif_transpose(image, in_place=True)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
        except AppError:
            raise
        except Image.DecompressionBombError as exc:
            raise InvalidInput(f"{upload.name}: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # What PIL raises for truncated data, broken headers and unsupported modes.
            raise InvalidInput(f"{upload.name}: the image cannot be decoded ({exc})") from exc
