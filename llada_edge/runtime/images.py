"""Image input and output of the runtime (numpy + Pillow only), following model-spec §4.4, §5.1 and §9.

* Understanding images go through :func:`smart_resize` (round each side to 32, keep the pixel count
  within [128², 800²], resize to cover with BICUBIC, centre-crop).
* Editing source images go through :func:`var_center_crop` with the 512-px crop list: pick the crop
  size whose aspect best matches, cut it from the centre of the *original* image (no downscale).
* Pixels for the image tokenizer: uint8 -> fp32, ×(1/255) first, then (x − mean) / std (§5.1).
* Decoded images: ×255 then truncated to uint8, as upstream does (§9).

Pixel-exact agreement with upstream matters here: a one-pixel shift of a crop changes every VQ id.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from llada_edge.errors import InputError

# Largest input image accepted (about 6300 x 6300): a PNG of a few hundred KB can declare 144 Mpx, and
# decoding it would take gigabytes before any resize; understanding and editing read at most ~1 Mpx.
MAX_INPUT_PIXELS = 40_000_000
SMART_RESIZE_FACTOR = 32
SMART_RESIZE_MIN_PIXELS = 128 * 128
SMART_RESIZE_MAX_PIXELS = 800 * 800
EDIT_BASE_SIZE = 512
EDIT_PATCH = 32

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; transparent pixels become white, as upstream composites RGBA on white (§5.1)."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path_or_image: str | Path | Image.Image) -> Image.Image:
    """An RGB image from a path or a PIL image; bad files raise :class:`InputError` naming the file."""
    if isinstance(path_or_image, Image.Image):
        if path_or_image.width * path_or_image.height > MAX_INPUT_PIXELS:
            raise InputError(f"image of {path_or_image.width}x{path_or_image.height} pixels is larger than the "
                             f"limit of {MAX_INPUT_PIXELS:,} pixels")
        return _to_rgb(path_or_image)
    path = Path(path_or_image)
    if not path.exists():
        raise InputError("file not found", file=path)
    if not path.is_file():
        raise InputError("not an image file (it is a directory or a special file)", file=path)
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the limit below is lower and is an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only: the size is known before any pixel is decoded
        with img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise InputError(f"image of {img.width}x{img.height} pixels is larger than the limit of "
                                 f"{MAX_INPUT_PIXELS:,} pixels (inputs are resized to at most 800x800)", file=path)
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image too large to open safely ({exc})", file=path) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise InputError(f"not an image file, or a truncated one ({exc})", file=path) from exc


def output_format(path: str | Path) -> str:
    """The image format an output path asks for (by its suffix), checked before any work is done: a folder
    that exists and can be written, a name that is not a folder, a suffix Pillow can write."""
    path = Path(path)
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"unknown image format {path.suffix!r} (use .png, .jpg, .webp, ...)", file=path)
    if path.is_dir():
        raise InputError("is a folder; give a file name", file=path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError("the folder to write into does not exist", file=path)
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError("cannot write here (permission denied or read-only file system)", file=path)
    return fmt


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write atomically in the format of the suffix: a uniquely named temporary file beside it, then rename, so
    concurrent writers never share a temporary file and a failure leaves nothing behind."""
    path = Path(path)
    fmt = output_format(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        image.save(tmp, format=fmt)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the image ({exc.strerror or exc})", file=path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_size(height: int, width: int, multiple: int = 32) -> None:
    """Generated images must be whole 32-px cells: 16-px VQ patches, decoded at 2× (model-spec §3)."""
    if (isinstance(height, bool) or isinstance(width, bool) or not isinstance(height, int)
            or not isinstance(width, int) or height <= 0 or width <= 0 or height % multiple or width % multiple):
        raise InputError(f"image size must be positive multiples of {multiple}, got {height}x{width}")


# ----------------------------------------------------------------------------------------------
# Understanding: smart_resize (§5.1)
# ----------------------------------------------------------------------------------------------


def smart_resize_dims(height: int, width: int, factor: int = SMART_RESIZE_FACTOR,
                      min_pixels: int = SMART_RESIZE_MIN_PIXELS,
                      max_pixels: int = SMART_RESIZE_MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with a pixel count kept in [min, max] (§5.1).

    Each side is rounded to the nearest multiple (Python ``round``, half to even, as the upstream
    Python does), at least one ``factor``. Above ``max_pixels`` both sides are scaled by
    sqrt(max / (H·W)) and floored to the factor (never below one factor); below ``min_pixels`` they
    are scaled by sqrt(min / (H·W)) and ceiled, so the result lands on the right side of the limit.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {height}x{width}")
    th = max(factor, round(height / factor) * factor)
    tw = max(factor, round(width / factor) * factor)
    if th * tw > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        th = max(factor, math.floor(height * scale / factor) * factor)
        tw = max(factor, math.floor(width * scale / factor) * factor)
    elif th * tw < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        th = math.ceil(height * scale / factor) * factor
        tw = math.ceil(width * scale / factor) * factor
    return th, tw


def smart_resize(img: Image.Image, factor: int = SMART_RESIZE_FACTOR, min_pixels: int = SMART_RESIZE_MIN_PIXELS,
                 max_pixels: int = SMART_RESIZE_MAX_PIXELS) -> Image.Image:
    """Resize to cover the :func:`smart_resize_dims` target with BICUBIC, then centre-crop to it (§5.1).

    Covering (scale = max(th/H, tw/W)) keeps the aspect ratio: nothing is stretched, the excess of
    the longer side is cut evenly. Resized sides are rounded and never below the target, so the crop
    never reaches past the border.
    """
    w, h = img.size
    th, tw = smart_resize_dims(h, w, factor, min_pixels, max_pixels)
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


# ----------------------------------------------------------------------------------------------
# Editing: var_center_crop (§4.4)
# ----------------------------------------------------------------------------------------------


def generate_crop_size_list(num_patches: int = (EDIT_BASE_SIZE // EDIT_PATCH) ** 2, patch_size: int = EDIT_PATCH,
                            max_ratio: float = 4.0, staircase: bool = False) -> list[tuple[int, int]]:
    """Candidate crop sizes (w, h) in pixels, ordered by w descending then h ascending.

    Default (model-spec §4.4 wording): every (w, h) in patch units with w·h <= ``num_patches`` and
    max(w, h) / min(w, h) <= ``max_ratio``. ``staircase=True`` keeps only the sizes on the edge of
    that region, {w·h <= N and (w+1)·(h+1) > N}, which is the set a widely copied upstream helper of
    the same name walks; kept as an option because the Uni source could not be checked.
    """
    if num_patches < 1 or patch_size < 1 or max_ratio < 1.0:
        raise ValueError("generate_crop_size_list: need num_patches >= 1, patch_size >= 1, max_ratio >= 1")
    sizes = []
    for wp in range(num_patches, 0, -1):
        for hp in range(1, num_patches // wp + 1):
            if max(wp, hp) / min(wp, hp) > max_ratio:
                continue
            if staircase and (wp + 1) * (hp + 1) <= num_patches:
                continue
            sizes.append((wp * patch_size, hp * patch_size))
    return sizes


def _aspect_match(crop: tuple[int, int], width: int, height: int) -> Fraction:
    """min(cw/W, ch/H) / max(cw/W, ch/H), exact: 1 when the crop has the image's aspect ratio.

    Computed with integers so that crops of the same aspect (1×1, 2×2, ... patches) tie exactly and
    the area tie-break decides, instead of float noise.
    """
    cw, ch = crop
    a, b = cw * height, ch * width  # cw/W and ch/H, both multiplied by W·H
    return Fraction(min(a, b), max(a, b))


def pick_crop_size(width: int, height: int, crop_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The crop whose aspect best matches a width×height image; ties go to the larger area."""
    if not crop_sizes:
        raise ValueError("var_center_crop: the crop size list is empty")
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {height}x{width}")
    return max(crop_sizes, key=lambda c: (_aspect_match(c, width, height), c[0] * c[1]))


def var_center_crop(img: Image.Image, crop_sizes: Sequence[tuple[int, int]]) -> Image.Image:
    """Cut the best-matching cw×ch box from the centre of the original image, then resize (§4.4).

    As upstream: no downscale before the crop, so a large image keeps only its central cw×ch
    pixels, and the LANCZOS resize to (cw, ch) is a no-op on a box that size. A box larger than the
    image reaches past the border and Pillow fills the outside with black.
    """
    w, h = img.size
    cw, ch = pick_crop_size(w, h, crop_sizes)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((cw, ch), Image.Resampling.LANCZOS)


@lru_cache(maxsize=8)
def _edit_crop_sizes(base_size: int) -> tuple[tuple[int, int], ...]:
    return tuple(generate_crop_size_list((base_size // EDIT_PATCH) ** 2, EDIT_PATCH, staircase=True))


def edit_source_image(img: Image.Image, base_size: int = EDIT_BASE_SIZE) -> Image.Image:
    """The editing source image: :func:`var_center_crop` with the ``base_size`` list ((512/32)² = 256
    patches of 32 px upstream).

    Uses the staircase list: the Uni ``utils.py`` could not be read, and the helper of that name that
    upstream projects share (and Uni very likely copied) walks the staircase, which also keeps every
    crop near the full patch budget instead of picking a small crop for a slightly better aspect.
    """
    if base_size < EDIT_PATCH or base_size % EDIT_PATCH:
        raise InputError(f"edit source size must be a positive multiple of {EDIT_PATCH}, got {base_size}")
    return var_center_crop(img, _edit_crop_sizes(base_size))


# ----------------------------------------------------------------------------------------------
# Pixels in and out
# ----------------------------------------------------------------------------------------------


def to_pixels(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [1, 3, H, W] for the image tokenizer: ×(1/255) first, then (x − mean) / std, all fp32 (§5.1).

    The order and the dtype are the upstream ones; doing it as (x − 255·mean) / (255·std) or in
    float64 gives values that differ in the last bits, and the VQ argmin can flip on such bits.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    x = np.asarray(img, dtype=np.uint8).astype(np.float32)
    x = x * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def to_pil(image_01: np.ndarray) -> Image.Image:
    """PIL image from a [1, 3, H, W] or [3, H, W] array in [0, 1]: ×255 then truncated, like upstream (§9).

    Values are clipped to [0, 255] first (NaN -> 0) so an out-of-range pixel saturates instead of
    wrapping around in the uint8 cast.
    """
    x = np.asarray(image_01)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_pil: expected a batch of one image, got shape {x.shape}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"to_pil: expected [1, 3, H, W] or [3, H, W], got shape {x.shape}")
    y = np.nan_to_num(x.astype(np.float32) * np.float32(255.0), nan=0.0)
    y = np.clip(y, 0.0, 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(y.transpose(1, 2, 0)))
