"""Photos and image files -> 28x28 uint8 images the way Fashion-MNIST was made.

The rule (Xiao et al., 2017, section 2: trim, fit the longest edge to 28, centre, negate, greyscale):
1. The file is read with Pillow (PNG, JPEG or BMP; EXIF rotation applied); transparent pixels become
   white (the product-photo background); colour becomes greyscale (ITU-R 601 luma).
2. The background is the median of the outermost ring of pixels. If it is light (> 127) the image is
   inverted: dataset images are light garments on black. The background level is then mapped to 0
   and the rest stretched to 0-255, so a grey backdrop becomes black like the dataset's.
3. An image that is already 28x28 is taken as it is after step 2 (it is in the dataset's format).
   Any other is trimmed to the box of pixels brighter than 10% of full scale (the garment), scaled so
   its longer edge is 28 pixels keeping the aspect ratio (area averaging when shrinking, bicubic when
   enlarging), and centred on a black 28x28 canvas.

Refused, each with a one-line reason, so that a batch of files goes on without them: unreadable or
truncated files, files over 50 MB, images over 50 megapixels (Pillow's own decompression-bomb check stays
in force too), aspect ratios beyond 10:1 (not a photo of one garment),
and images with nothing but background (28x28 ones too).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist import IMAGE_SIDE

log = logging.getLogger(__name__)
PILLOW_DIR = Path(Image.__file__).parent  # where Pillow's warnings come from

FORMATS = ("PNG", "JPEG", "BMP")  # phone cameras' multi-picture JPEGs open as JPEG too
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
MAX_FILE_BYTES = 50 * 2 ** 20
MAX_PIXELS = 50_000_000
MAX_ASPECT = 10.0
LIGHT_BACKGROUND = 127
GARMENT_THRESHOLD = 0.1 * 255


class ImageRejected(Exception):
    """This file cannot be turned into an input: the message says why (one line)."""


def read_image(path: Path) -> np.ndarray:
    """Decode an image file into greyscale uint8 [H, W], refusing what cannot be a photo of one garment."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageRejected(f"cannot be read ({e.strerror or e})") from e
    if size == 0:
        raise ImageRejected("empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageRejected(f"{size / 2 ** 20:.0f} MB: larger than the {MAX_FILE_BYTES // 2 ** 20} MB accepted "
                            "for a photo of one garment")
    try:
        with warnings.catch_warnings(record=True) as noted:
            warnings.simplefilter("always", UserWarning)  # recorded, each once per image: Pillow's are logged below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as im:  # reads the header only
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageRejected(f"{w}x{h} pixels: more than the {MAX_PIXELS // 10 ** 6} megapixels accepted "
                                        "for a photo of one garment (a decompression bomb?)")
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise ImageRejected(f"{w}x{h} pixels: an aspect ratio beyond {MAX_ASPECT:.0f}:1 is not a photo "
                                        "of one garment")
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(white, rgba)
                grey = to_grey8(im)
        for note in noted:
            if Path(note.filename).is_relative_to(PILLOW_DIR):  # Pillow's note on this file (corrupt EXIF data)
                log.warning("%s: %s", path, str(note.message).strip())
            else:  # another library's: as Python would show it
                warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
        return grey
    except ImageRejected:
        raise
    except UnidentifiedImageError as e:
        raise ImageRejected("not a readable PNG, JPEG or BMP image (corrupt, or another format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"refused as a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageRejected(f"corrupt or truncated image ({e})") from e


# Integer modes deeper than 8 bits (a 16-bit greyscale PNG opens as one of these) and their full scale.
# Pillow's own convert("L") clips them at 255 instead of scaling, which turns a 16-bit picture into black and white.
DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_grey8(im: Image.Image) -> np.ndarray:
    """Any Pillow image as greyscale uint8 [H, W], scaled by its mode's value range (ITU-R 601 luma for colour)."""
    if im.mode in DEEP_MODES:
        values = np.asarray(im, dtype=np.float64)
        return np.rint(np.clip(values, 0, DEEP_MODES[im.mode]) * (255 / DEEP_MODES[im.mode])).astype(np.uint8)
    if im.mode == "F":  # floating point: taken as 0-1
        return np.rint(np.clip(np.asarray(im, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def to_dataset_format(grey: np.ndarray) -> np.ndarray:
    """Greyscale uint8 [H, W] -> a Fashion-MNIST-style uint8 [28, 28] (the module docstring's rule)."""
    grey = np.asarray(grey, dtype=np.uint8)
    ring = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    background = float(np.median(ring))
    x = grey.astype(np.float32)
    if background > LIGHT_BACKGROUND:
        x, background = 255 - x, 255 - background
    if background > 0:
        x = np.clip((x - background) * (255 / (255 - background)), 0, 255)
    x = np.rint(x).astype(np.uint8)
    rows = np.flatnonzero((x > GARMENT_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((x > GARMENT_THRESHOLD).any(axis=0))
    if not len(rows):  # a 28x28 one too: every dataset image has a pixel of 254 or more, so a blank one is no garment
        raise ImageRejected("nothing but background: no garment found")
    if x.shape == (IMAGE_SIDE, IMAGE_SIDE):
        return x
    crop = Image.fromarray(x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    h, w = crop.height, crop.width
    scale = IMAGE_SIDE / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    fitted = crop.resize((new_w, new_h), resample)
    canvas = Image.new("L", (IMAGE_SIDE, IMAGE_SIDE), 0)
    canvas.paste(fitted, ((IMAGE_SIDE - new_w) // 2, (IMAGE_SIDE - new_h) // 2))
    return np.asarray(canvas, dtype=np.uint8).copy()


def load_image(path: Path) -> np.ndarray:
    """An image file as a Fashion-MNIST-style uint8 [28, 28]; raises ImageRejected with the reason."""
    return to_dataset_format(read_image(path))
