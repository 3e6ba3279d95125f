"""Robust image decoding and the model's preprocessing transform.

``load_rgb`` turns whatever a source hands over (a path, bytes, a PIL image) into an RGB PIL image, or
raises ``DecodeError`` with a short reason; it never lets a bad file stop a run. Choices:
- EXIF orientation is applied (a broken EXIF block is ignored, the pixels are kept as stored);
- transparency (RGBA, LA, PA, palette with a transparent colour) is composited on a white background;
- 16- and 32-bit grey (I;16*, I, F) is scaled to 8 bit, not clipped;
- CMYK and other modes use PIL's conversion; multi-frame files give their first frame;
- images over ``max_pixels`` (default: PIL's ``Image.MAX_IMAGE_PIXELS``) are refused as decompression bombs;
- with ``draft_size``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled
  decoding, ``Image.draft``) when both sides stay at least ``draft_size``: several times faster for large
  photos, and the pixels differ slightly from a full decode followed by the same resize.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from itae.errors import DecodeError, InputError
from itae.models.base import Preprocess

WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_rgb(
    src: str | os.PathLike | bytes | Image.Image, *, max_pixels: int | None = None, draft_size: int | None = None
) -> Image.Image:
    """Decode ``src`` to a fully loaded RGB image, or raise ``DecodeError``.

    draft_size: allow a JPEG to decode at reduced scale as long as both sides stay >= this (the shorter
    side the image will be resized to). None decodes every pixel.
    """
    if draft_size is not None and (isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1):
        raise InputError(f"draft_size must be a positive integer or None; got {draft_size!r}")
    if isinstance(src, Image.Image):
        return _to_rgb(_apply_exif(src))
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise DecodeError("empty file (0 bytes)")
        fp: Any = io.BytesIO(data)
    else:
        path = Path(src)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DecodeError("file not found") from None
        except OSError as e:
            raise DecodeError(f"cannot read file: {e.strerror or e}") from None
        if path.is_dir():
            raise DecodeError("is a folder, not an image file")
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        fp = path
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as im:
                w, h = im.size
                if limit and w * h > limit:
                    raise DecodeError(f"decompression bomb: {w}x{h} pixels exceeds the limit of {limit}")
                if draft_size is not None and im.format in ("JPEG", "MPO"):  # MPO: cameras' multi-picture JPEG
                    im.draft(im.mode, (draft_size, draft_size))  # largest 1/k with both sides >= draft_size
                im.load()
                im = _apply_exif(im)
                return _to_rgb(im)
        except DecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecodeError(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise DecodeError("not an image (unrecognised format)") from None
        except PermissionError as e:
            raise DecodeError(f"cannot read file: {e.strerror or e}") from None
        except OSError as e:
            msg = str(e)
            if "truncated" in msg.lower():
                raise DecodeError(f"truncated image ({msg})") from None
            raise DecodeError(f"corrupt image ({msg})") from None
        except Exception as e:  # plugins raise SyntaxError, ValueError, struct.error, ...
            raise DecodeError(f"corrupt image ({type(e).__name__}: {e})") from None


def _apply_exif(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not lose the image
        return im
    return im if out is None else out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _wide_grey_to_rgb(im)
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "HSV"):
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise DecodeError(f"unsupported image mode {mode!r} ({e})") from None


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey to 8-bit RGB by scaling, as ``convert`` would clip at 255."""
    a = np.asarray(im)
    if a.ndim == 3:  # some plugins hand back (H, W, 1)
        a = a[..., 0]
    a = a.astype(np.float64)
    if im.mode == "F":
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
    else:
        hi_val = float(a.max()) if a.size else 0.0
        lo = 0.0
        if im.mode.startswith("I;16") or hi_val <= 65535:
            hi = 255.0 if hi_val <= 255 and not im.mode.startswith("I;16") else 65535.0
        else:
            lo, hi = float(a.min()), hi_val
    scaled = np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")


_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class PreprocessTransform:
    """RGB PIL image -> float32 tensor (3, S, S): resize the shorter side, centre crop, scale, normalise.

    Split in two for extraction: ``to_uint8`` (resize and crop, in DataLoader workers) and ``normalize``
    (scale and normalise, on the device), so workers and the host-to-device copy move 1 byte per value
    instead of 4. The two halves give exactly what ``__call__`` gives. A plain class (not a closure), so
    DataLoader workers can receive it under any start method.
    """

    def __init__(self, preprocess: Preprocess) -> None:
        if preprocess.interpolation not in _INTERPOLATION:
            raise InputError(
                f"unknown interpolation {preprocess.interpolation!r}; use one of {', '.join(_INTERPOLATION)}"
            )
        if preprocess.resize_size < preprocess.image_size:
            raise InputError(
                f"resize_size {preprocess.resize_size} is smaller than the crop {preprocess.image_size}"
            )
        self.preprocess = preprocess
        self._resample = _INTERPOLATION[preprocess.interpolation]
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)

    def to_uint8(self, im: Image.Image) -> torch.Tensor:
        """Resized, centre-cropped pixels as a uint8 tensor (3, S, S)."""
        p = self.preprocess
        w, h = im.size
        short = min(w, h)
        if short != p.resize_size:
            # Same rounding as torchvision's Resize(int), so embeddings match the usual DINOv2 pipeline.
            long = int(p.resize_size * max(w, h) / short)
            nw, nh = (p.resize_size, long) if w <= h else (long, p.resize_size)
            im = im.resize((nw, nh), self._resample)
            w, h = nw, nh
        s = p.image_size
        left = int(round((w - s) / 2.0))
        top = int(round((h - s) / 2.0))
        im = im.crop((left, top, left + s, top + s))
        a = np.array(im, dtype=np.uint8)  # (S, S, 3), a writable copy
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()  # (S, S, 3) -> (3, S, S)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) on any device -> float32 normalised, on the same device."""
        mean, std = self._mean.to(pixels.device), self._std.to(pixels.device)
        return pixels.float().div_(255.0).sub_(mean).div_(std)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(im))


def build_transform(preprocess: Preprocess) -> PreprocessTransform:
    """The preprocessing transform of a model (``backbone.preprocess``, maybe ``.with_resolution(...)``)."""
    return PreprocessTransform(preprocess)


__all__ = ["DecodeError", "PreprocessTransform", "build_transform", "load_rgb"]
