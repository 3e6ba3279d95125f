"""Robust decoding: every PIL mode to RGB, EXIF orientation, bad files as DecodeError, preprocessing parity."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from itae.data.dataset import ImageDataset, collate_images
from itae.data.decode import DecodeError, build_transform, load_rgb
from itae.data.sources import ListSource
from itae.models.base import Preprocess


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels but holds one empty row: enough for Image.open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV", "LA", "RGBA", "PA", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB")
    if mode == "PA":
        im = base.convert("P").convert("PA")
    elif mode in ("I;16", "I", "F"):
        im = Image.fromarray(rng.integers(0, 65535, (12, 10)).astype(np.uint16)).convert(mode)
    else:
        im = base.convert(mode)
    out = load_rgb(im)
    assert out.mode == "RGB"
    assert out.size == (10, 12)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    for im in (Image.fromarray(a), Image.open(io.BytesIO(_encode(Image.fromarray(a), "PNG")))):
        assert im.mode.startswith("I")
        out = np.asarray(load_rgb(im))
        np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_grey_in_unit_range_is_scaled():
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(load_rgb(im))[0, :, 1], [0, 128, 255])


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # transparent red -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> grey
    out = np.asarray(load_rgb(Image.open(io.BytesIO(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert 120 <= out[1, 0, 0] <= 135


def test_palette_with_transparent_index_goes_white():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    data = _encode(im, "PNG", transparency=0)
    out = np.asarray(load_rgb(data))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (10, 200, 30)


def test_exif_orientation_is_applied():
    a = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; left half white
    a[:, :20] = 255
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_rgb(_encode(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[:15].mean() > 200 and arr[-15:].mean() < 60  # the white half is now on top


# -------------------------------------------------------------------------------------- bad files


def test_zero_byte_inputs(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    for src in (p, b""):
        with pytest.raises(DecodeError, match="empty file"):
            load_rgb(src)


def test_not_an_image_and_missing_file(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, not a png")
    with pytest.raises(DecodeError, match="not an image"):
        load_rgb(p)
    with pytest.raises(DecodeError, match="file not found"):
        load_rgb(tmp_path / "absent.jpg")
    with pytest.raises(DecodeError, match="folder"):
        load_rgb(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        load_rgb(data[: len(data) // 2])


def test_decompression_bomb():
    # Above PIL's warning limit (89.5 MP) but below its hard error: PIL alone would only warn.
    with pytest.raises(DecodeError, match="decompression bomb"):
        load_rgb(_png_header_only(10_000, 10_000))
    # Our own limit applies before any pixel is decoded.
    with pytest.raises(DecodeError, match="decompression bomb: 40x40"):
        load_rgb(_encode(Image.new("RGB", (40, 40)), "PNG"), max_pixels=1000)
    assert load_rgb(_encode(Image.new("RGB", (30, 30)), "PNG"), max_pixels=1000).size == (30, 30)


# ---------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_transform_matches_torchvision(interp):
    from torchvision import transforms as T

    p = Preprocess(image_size=56, resize_size=64, interpolation=interp)
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (77, 131, 3), dtype=np.uint8))
    mode = T.InterpolationMode.BICUBIC if interp == "bicubic" else T.InterpolationMode.BILINEAR
    ref = T.Compose([T.Resize(64, interpolation=mode), T.CenterCrop(56), T.ToTensor(), T.Normalize(p.mean, p.std)])
    t = build_transform(p)
    x = t(im)
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref(im), rtol=0, atol=1e-6)
    # The split used by extraction (uint8 in workers, normalise on the device) gives the same values.
    u = t.to_uint8(im)
    assert u.dtype == torch.uint8 and u.shape == (3, 56, 56)
    assert torch.equal(t.normalize(u[None])[0], x)


def test_transform_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        build_transform(Preprocess(interpolation="sinc"))


def test_dataset_and_loader_with_workers_never_raise(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "list.txt").write_text("ok.png\nzero.jpg\ntext.jpg\nmissing.png\nok.png\n")
    source = ListSource(tmp_path / "list.txt")
    ds = ImageDataset(source, build_transform(Preprocess(image_size=28, resize_size=32)))
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_images)
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches]).tolist()
    failed = dict(zip(sum((b["failed_index"] for b in batches), []), sum((b["failed_reason"] for b in batches), []),
                      strict=True))
    assert index == [0, 4]
    assert failed == {1: "empty file (0 bytes)", 2: "not an image (unrecognised format)", 3: "file not found"}
    assert batches[0]["pixels"].shape == (1, 3, 28, 28)
    assert batches[1]["pixels"].shape == (1, 3, 28, 28)


# ------------------------------------------------------------------------------ reduced-scale JPEG


def _smooth_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field: the kind of content where scaled DCT decoding is close to a full decode."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def test_draft_size_decodes_a_large_jpeg_at_reduced_scale_keeping_both_sides_above_it():
    data = _encode(_smooth_photo(1200, 900), "JPEG", quality=92)
    assert load_rgb(data).size == (1200, 900)
    # 900 // 256 = 3, so the largest usable DCT scale is 1/2; both sides stay >= 256.
    assert load_rgb(data, draft_size=256).size == (600, 450)
    assert load_rgb(data, draft_size=100).size == (150, 113)  # 1/8, rounded up by libjpeg
    assert load_rgb(data, draft_size=600).size == (1200, 900)  # 900 // 600 = 1: no reduction


def test_draft_size_applies_to_cameras_multi_picture_jpegs():
    im = _smooth_photo(1200, 900)
    data = _encode(im, "MPO", save_all=True, append_images=[im], quality=92)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert load_rgb(data, draft_size=256).size == (600, 450)


def test_draft_size_leaves_small_jpegs_and_other_formats_untouched():
    small = _encode(_smooth_photo(300, 200), "JPEG", quality=92)
    np.testing.assert_array_equal(np.asarray(load_rgb(small, draft_size=128)), np.asarray(load_rgb(small)))
    png = _encode(_smooth_photo(1200, 900), "PNG")
    assert load_rgb(png, draft_size=256).size == (1200, 900)


def test_draft_size_keeps_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: a 1200 x 900 file shows as 900 x 1200
    data = _encode(_smooth_photo(1200, 900), "JPEG", quality=92, exif=exif.tobytes())
    assert load_rgb(data, draft_size=256).size == (450, 600)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "256"])
def test_draft_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="draft_size"):
        load_rgb(_encode(_smooth_photo(60, 40), "JPEG"), draft_size=bad)


def test_fast_decode_dataset_gives_nearly_the_same_pixels_for_large_photos(tmp_path):
    paths = []
    for i, size in enumerate([(1600, 1200), (1200, 1600), (700, 500)]):
        paths.append(tmp_path / f"{i}.jpg")
        _smooth_photo(*size, seed=i).save(paths[-1], quality=92)
    (tmp_path / "list.txt").write_text("\n".join(p.name for p in paths))
    source = ListSource(tmp_path / "list.txt")
    transform = build_transform(Preprocess(image_size=224, resize_size=256))
    full = ImageDataset(source, transform, uint8=True)
    fast = ImageDataset(source, transform, uint8=True, fast_decode=True)
    for i in range(3):
        a, b = full[i][1], fast[i][1]
        assert a.shape == b.shape == (3, 224, 224)
        diff = (a.int() - b.int()).abs().float()
        assert diff.mean() < 1.5, (i, diff.mean())  # a fraction of one grey level on average
        if i == 2:  # 500 < 2 x 256: no reduced scale applies, so the pixels are the full decode's
            assert diff.max() == 0
