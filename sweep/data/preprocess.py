"""The one image transform every stage feeds a model (a contract: ``sweep.data.preprocess``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch


def _border_fill(image: Image.Image) -> int | tuple[int, ...]:
    """Median colour of the outermost pixels: micrographs have a flat background, so padding with it
    adds no edge that a model could mistake for structure."""
    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)
    med = np.median(border, axis=0)
    if image.mode == "F":
        return float(med)
    return tuple(int(v) for v in np.atleast_1d(med)) if a.ndim == 3 else int(med)


# Pillow modes of more than 8 bits (16-bit PNG and TIFF, 32-bit integer and float TIFF) and the value that is
# white in each: integer images span their type's range, as torchvision's and scikit-image's conversions
# read them (a 16-bit value v is v / 65535; Pillow decodes some 16-bit files to 32-bit "I"), float images
# [0, 1]; values outside are clipped. Pillow's own conversion to "L" clips instead of scaling: every 16-bit
# image came out white and a [0, 1] float image black.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _wide_to_float(image: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits as a float ("F") image on the 8-bit scale [0, 255]; the
    pixels of a transparent value (a 16-bit PNG's tRNS chunk) white, as transparent pixels are."""
    raw = np.asarray(image)
    if raw.dtype.kind == "f" and np.isnan(raw).any():  # clipping keeps NaN, and resizing spreads it
        raise ValueError(f"{int(np.isnan(raw).sum())} pixel(s) of this float image are NaN: no grey level to read")
    a = np.clip(raw.astype(np.float32) * np.float32(255.0 / WIDE_MODES[image.mode]), np.float32(0.0),
                np.float32(255.0))
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        a[raw == transparent] = np.float32(255.0)
    return Image.fromarray(a, mode="F")


def preprocess(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """Return ``image`` as a float32 tensor of shape (channels, size, size) with values in [-1, 1].

    Any size, aspect ratio or mode is accepted. The image is padded to a square with its own background
    colour (never stretched), then resized with antialiasing, so shapes keep their proportions. 8-bit
    images map 0..255 to [-1, 1]; images of more bits are read on their type's range (`WIDE_MODES`);
    transparent pixels are white.
    """
    import torch

    return torch.from_numpy(preprocess_array(image, size, channels))


def preprocess_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """`preprocess` as a numpy array, bit for bit (float32 division and subtraction are the same IEEE
    operations in numpy and torch). Decode workers use it and never import torch: each of them would pay
    seconds of start-up for it, on the same cores as the encoder actors."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    image = ImageOps.exif_transpose(image)
    wide = image.mode in WIDE_MODES  # kept single-channel float here; copied to 3 channels at the end
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info and not wide):
        # transparent pixels keep whatever colour their writer left (often black): composite on white, as
        # Hugging Face's image processors do, rather than let that colour become the background
        # (not a wide image: Pillow's RGBA conversion clips its values to 255, all white; `_wide_to_float`)
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    image = _wide_to_float(image) if wide else image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = max(w, h)
    if w != h:
        square = Image.new(image.mode, (side, side), _border_fill(image))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[None] if channels == 1 else np.repeat(a[None], 3, axis=0)
    else:
        a = a.transpose(2, 0, 1)
    a = np.ascontiguousarray(a) / np.float32(127.5) - np.float32(1.0)
    return np.clip(a, np.float32(-1.0), np.float32(1.0), out=a)


def decode_rows(paths, indices, size: int, channels: int) -> tuple[np.ndarray, list[str]]:
    """Decode and preprocess many table rows: (images float32 (n, C, size, size), error per row).

    An unreadable, truncated or corrupt image does not stop the batch: its slot stays zero and its
    error names the cause, so the caller can skip, list and count it.
    """
    from sweep.data.sources import load_image

    out = np.zeros((len(paths), channels, size, size), dtype=np.float32)
    errors = [""] * len(paths)
    for i, (path, index) in enumerate(zip(paths, indices)):
        try:
            out[i] = preprocess_array(load_image(str(path), int(index)), size, channels)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image, not a bad job
            errors[i] = f"{type(e).__name__}: {e}".strip()[:300] or type(e).__name__
            if int(index) < 0 and _empty(str(path)):  # Pillow says only "cannot identify image file"
                errors[i] = f"empty file (0 bytes): {errors[i]}"[:300]
    return out, errors


def _empty(path: str) -> bool:
    """A file of 0 bytes (a copy or download that never finished)."""
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


def unreadable_rows(rows, size: int, channels: int) -> list[tuple[str, str]]:
    """(file, error) of each row of a table frame (`path`, `index` columns) that does not decode."""
    _, errors = decode_rows(rows["path"].tolist(), rows["index"].tolist(), size, channels)
    return [(str(path), error) for path, error in zip(rows["path"], errors) if error]
