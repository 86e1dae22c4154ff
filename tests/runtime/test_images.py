"""Image preprocessing and output (model-spec §4.4, §5.1, §9), with sizes worked by hand from the spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llada_edge.errors import InputError
from llada_edge.runtime.images import (
    check_size,
    edit_source_image,
    generate_crop_size_list,
    load_image,
    pick_crop_size,
    smart_resize,
    smart_resize_dims,
    to_pil,
    to_pixels,
    var_center_crop,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# smart_resize (§5.1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hw", "expected"), [
    ((800, 800), (800, 800)),     # exactly max_pixels: kept
    ((801, 801), (800, 800)),     # rounds to 800 (25.03 -> 25)
    # 992x3008 > 800²: s = sqrt(640000/3e6) = 0.46188; 461.9/32 = 14.43 -> 448; 1385.6/32 = 43.3 -> 1376
    ((1000, 3000), (448, 1376)),
    # 64x64 < 128²: s = sqrt(16384/2500) = 2.56; 50*2.56 = 128 -> ceil(4)*32
    ((50, 50), (128, 128)),
    # 96x32 < 128²: s = sqrt(16384/3000) = 2.337; 233.7/32 = 7.3 -> 256; 70.1/32 = 2.19 -> 96
    ((100, 30), (256, 96)),
    ((80, 400), (64, 384)),       # 2.5 -> 2 and 12.5 -> 12: Python round, half to even
    ((640, 800), (640, 800)),
])
def test_smart_resize_dims(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    th, tw = smart_resize_dims(*hw)
    assert (th, tw) == expected
    assert th % 32 == 0 and tw % 32 == 0
    assert 128 * 128 <= th * tw <= 800 * 800


def test_smart_resize_dims_rejects_empty() -> None:
    with pytest.raises(InputError):
        smart_resize_dims(0, 10)


def test_smart_resize_covers_then_crops_centre() -> None:
    img = random_image(30, 100)  # W=30, H=100 -> target 256x96 (h x w)
    out = smart_resize(img)
    assert out.size == (96, 256)
    # Cover: scale = max(256/100, 96/30) = 3.2 -> 96x320, then the central 256 rows.
    expected = img.resize((96, 320), Image.Resampling.BICUBIC).crop((0, 32, 96, 288))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_smart_resize_keeps_a_conforming_image() -> None:
    img = random_image(800, 640)
    assert np.array_equal(np.asarray(smart_resize(img)), np.asarray(img))


# ----------------------------------------------------------------------------------------------
# var_center_crop (§4.4)
# ----------------------------------------------------------------------------------------------


def test_crop_size_list_default() -> None:
    sizes = generate_crop_size_list()
    assert len(sizes) == len(set(sizes))
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert (w // 32) * (h // 32) <= 256
        assert max(w, h) / min(w, h) <= 4.0
    assert {(512, 512), (1024, 256), (256, 1024), (704, 352), (32, 32)} <= set(sizes)
    assert (1056, 256) not in sizes and (1024, 224) not in sizes  # too many patches / ratio > 4
    assert sizes == generate_crop_size_list()  # deterministic order


def test_crop_size_list_staircase_by_hand() -> None:
    # N = 8: sizes with w*h <= 8 and (w+1)*(h+1) > 8 and ratio <= 4, w descending then h ascending.
    assert generate_crop_size_list(8, 1, staircase=True) == [(4, 1), (4, 2), (3, 2), (2, 2), (2, 3), (2, 4), (1, 4)]
    assert set(generate_crop_size_list(8, 1, staircase=True)) < set(generate_crop_size_list(8, 1))


@pytest.mark.parametrize(("wh", "expected"), [
    ((1000, 1000), (512, 512)),   # every square crop ties at 1; the largest wins
    ((2000, 1000), (704, 352)),   # 2:1 -> 22x11 patches
    ((1000, 2000), (352, 704)),
    ((700, 500), (448, 320)),     # 7:5 exactly: 14x10 patches
    ((5000, 100), (1024, 256)),   # beyond 4:1 -> the widest allowed
])
def test_var_center_crop_picks_aspect(wh: tuple[int, int], expected: tuple[int, int]) -> None:
    assert pick_crop_size(*wh, generate_crop_size_list()) == expected


def test_pick_crop_size_on_staircase_list() -> None:
    # 7:5 is not on the staircase; the closest is 18x13 patches (ratio 1.385 vs 1.4).
    assert pick_crop_size(700, 500, generate_crop_size_list(staircase=True)) == (576, 416)


def test_var_center_crop_does_not_downscale() -> None:
    img = random_image(2000, 1000, seed=1)
    out = var_center_crop(img, generate_crop_size_list())
    assert out.size == (704, 352)
    left, top = (2000 - 704) // 2, (1000 - 352) // 2
    assert np.array_equal(np.asarray(out), np.asarray(img)[top:top + 352, left:left + 704])
    assert np.array_equal(np.asarray(edit_source_image(img)), np.asarray(out))


def test_var_center_crop_small_image_is_padded_black() -> None:
    img = Image.new("RGB", (100, 100), (200, 100, 50))
    out = np.asarray(var_center_crop(img, generate_crop_size_list()))
    assert out.shape == (512, 512, 3)
    off = (512 - 100) // 2  # the box starts at -206: the image sits in the middle
    assert (out[off:off + 100, off:off + 100] == (200, 100, 50)).all()
    assert (out[:off] == 0).all() and (out[:, off + 100:] == 0).all()


# ----------------------------------------------------------------------------------------------
# Pixels in / out
# ----------------------------------------------------------------------------------------------


def test_to_pixels_order_of_operations() -> None:
    values = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([values, values[::-1], values], axis=-1)[None].repeat(2, axis=0))  # 2x256
    px = to_pixels(img, CLIP_MEAN, CLIP_STD)
    assert px.shape == (1, 3, 2, 256) and px.dtype == np.float32
    x = values.astype(np.float32)
    mean, std = np.float32(CLIP_MEAN[0]), np.float32(CLIP_STD[0])
    expected = (x * np.float32(1 / 255) - mean) / std
    assert np.array_equal(px[0, 0, 0], expected)
    assert np.array_equal(px[0, 1, 1], (x[::-1] * np.float32(1 / 255) - np.float32(CLIP_MEAN[1]))
                          / np.float32(CLIP_STD[1]))
    # The other orders give different fp32 bits somewhere: the rescale really comes first.
    assert not np.array_equal(px[0, 0, 0], (x / np.float32(255) - mean) / std)
    assert not np.array_equal(px[0, 0, 0], (x - np.float32(255) * mean) / (np.float32(255) * std))
    half = to_pixels(Image.new("RGB", (1, 1), (255, 0, 255)), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert half.ravel().tolist() == [1.0, -1.0, 1.0]


def test_to_pil_truncates() -> None:
    arr = np.zeros((1, 3, 1, 6), dtype=np.float32)
    arr[0, 0, 0] = [0.999, 0.5, 1.0, 0.0, 1.5, -0.2]
    out = np.asarray(to_pil(arr))
    assert out.shape == (1, 6, 3)
    assert out[0, :, 0].tolist() == [254, 127, 255, 0, 255, 0]  # 254.7 -> 254, 127.5 -> 127, clipped
    assert np.array_equal(np.asarray(to_pil(arr[0])), out)
    with pytest.raises(ValueError):
        to_pil(np.zeros((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        to_pil(np.zeros((4, 4, 3), dtype=np.float32))


def test_check_size() -> None:
    check_size(512, 768)
    for h, w in [(500, 512), (0, 32), (32, -32)]:
        with pytest.raises(InputError, match=f"positive multiples of 32, got {h}x{w}"):
            check_size(h, w)


# ----------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------


def test_load_image_missing_and_not_an_image(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="file not found") as err:
        load_image(missing)
    assert str(missing) in str(err.value)
    text = tmp_path / "notes.png"
    text.write_text("hello, not a png")
    with pytest.raises(InputError, match="not an image file") as err:
        load_image(text)
    assert err.value.file == str(text)
    with pytest.raises(InputError, match="not an image file"):
        load_image(tmp_path)


def test_load_image_composites_alpha_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)      # fully transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)    # opaque -> unchanged
    rgba[0, 2] = (0, 0, 0, 128)       # half black on white -> about 127
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    px = np.asarray(out)
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [10, 20, 30]
    assert all(126 <= v <= 128 for v in px[0, 2])


def test_load_image_palette_transparency_and_pil_input() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 (red) is transparent
    assert np.asarray(load_image(pal)).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    gray = Image.new("L", (3, 2), 77)
    out = load_image(gray)
    assert out.mode == "RGB" and out.size == (3, 2) and np.asarray(out)[0, 0].tolist() == [77, 77, 77]
