"""Images as ega-ray stores and reads them: PNG/JPEG bytes in, uint8 (H, W, 3) out, with a pixel limit, and
16-bit images scaled rather than clipped. The decoding transform of Ray Data and of ``ega-ray prepare``.
No pyarrow, no torch."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from ega_ray.constants import MAX_PIXELS
from ega_ray.errors import DataError


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def to_rgb8(im: Image.Image) -> np.ndarray:
    """An opened image as uint8 (H, W, 3). 16-bit images are scaled to 8 bits (PIL's own conversion would
    clip every value above 255 to white); everything else goes through PIL's RGB conversion."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale (PIL opens some as 32-bit "I")
        gray = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open encoded image bytes, refusing (ValueError) more than ``max_pixels`` before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
        im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w * h > max_pixels:
        raise ValueError(f"{w}×{h} = {w * h:,} pixels is over the limit of {max_pixels:,}")
    return im


def decode_images(batch: dict[str, np.ndarray], image_size: int, split: str = "images") -> dict[str, np.ndarray]:
    """Ray Data batch transform: PNG/JPEG bytes (or uint8 arrays) → uint8 (N, S, S, 3). An image that cannot
    be decoded stops the run with a DataError naming ``split`` and the row's ``index``."""
    out = []
    for i, item in enumerate(batch["image"]):
        if isinstance(item, (bytes, bytearray)):
            try:
                im = open_image(item)
                im.load()
                rgb = to_rgb8(im)
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError…
                row = f"index {batch['index'][i]}" if "index" in batch else f"batch row {i}"
                raise DataError(
                    f"{split}: the image of the row with {row} cannot be decoded ({type(err).__name__}: {err}); "
                    "convert the data with `ega-ray prepare` (its --skip-bad leaves such images out)"
                ) from None
            if rgb.shape[:2] != (image_size, image_size):
                rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.BICUBIC))
            out.append(rgb)
        else:
            out.append(np.asarray(item, dtype=np.uint8))
    batch["image"] = np.stack(out)
    return batch
