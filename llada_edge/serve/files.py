"""What a request may read and write: images from data URLs or from the folders the server was given, and
generated images into its one output folder. Nothing in a request can name a file outside those folders (paths
are resolved, symlinks included, before the check).
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from llada_edge.errors import InputError
from llada_edge.runtime.images import load_image, save_image

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # an encoded input image (data URL or upload); pixels are limited by load_image


class Forbidden(InputError):
    """A request named a file outside the folders the server may read or write (HTTP 403)."""


def decode_image_bytes(data: bytes, what: str) -> Image.Image:
    """An RGB image from encoded bytes (PNG, JPEG, WebP...), within the byte and pixel limits."""
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{what}: {len(data):,} bytes, more than the limit of {MAX_IMAGE_BYTES:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # the header only: the size is checked before decoding
        return load_image(img)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what}: image too large to open safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{what}: not an image, or a truncated one ({exc})") from exc


def inside(path: Path, folders: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(folder.resolve()) for folder in folders)


def read_image_url(url: str, readable: Sequence[Path], what: str) -> Image.Image:
    """``data:image/...;base64,...``, or a file path (``file://`` or plain) inside one of ``readable``."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(f"{what}: a data URL must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{what}: invalid base64 ({exc})") from exc
        return decode_image_bytes(data, what)
    if "://" in url and not url.startswith("file://"):
        raise InputError(f"{what}: only data: URLs and file paths are accepted (the server fetches nothing)")
    path = Path(url.removeprefix("file://"))
    if not readable:
        raise Forbidden(f"{what}: this server reads no files (start it with --image-dir to allow a folder); "
                        "send the image as a data URL")
    if not path.is_absolute() or not inside(path, readable):
        raise Forbidden(f"{what}: {path} is not inside a folder this server may read "
                        f"({', '.join(str(f) for f in readable)})")
    return load_image(path)


def write_output(image: Image.Image, folder: Path) -> Path:
    """Save a generated image under ``folder`` with a fresh name (atomically); the request picks no name."""
    return save_image(image, folder / f"{uuid.uuid4().hex}.png")


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
