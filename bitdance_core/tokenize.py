"""The binary tokenizer's torch-free half (numpy only inside functions): image intake, size policy, packing.

Shared by the HTTP front end (which never imports torch: it checks a request before a worker sees it) and
the worker / CLI (``image_tokenizer.py`` runs the autoencoder). Conventions, as ``return_tokens``:

* tokens ``(N, C)``: N = (H/f)·(W/f) tokens of C = ``z_channels`` bits, in generation order: the latent grid
  cut into ``patch_size × patch_size`` patches, patches row-major, tokens row-major inside a patch
  (``patch_size`` 1 = plain raster order);
* packed: ``numpy.packbits`` of the row-major ``(N, C)`` bits, most significant bit first, bit 1 = +1,
  bit 0 = -1; the last byte's unused bits are 0.

Size policy (:class:`TokenizerSpec`): with a generator loaded, the sizes it serves; tokenizer-only, any
``W × H`` that are multiples of ``f · patch_size`` up to ``max_side``. An image of another size is refused
(``resize: "refuse"``, the default) or resized to an allowed size (``"fit"``: stretched; ``"crop"``: scaled
to cover, then centre-cropped), and the answer says which size was encoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass
from typing import Any

RESIZE_MODES = ("refuse", "fit", "crop")
PATCH_SIZES = (1, 2, 4, 8)  # token orders: the official 1x, 4x, 16x and 64x models' patch sides
INPUT_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
MAX_INPUT_SIDE = 4096
MAX_INPUT_PIXELS = MAX_INPUT_SIDE**2  # an uploaded image larger than this (declared in its header) is refused
DEFAULT_MAX_SIDE = 2048  # tokenizer-only servers: the longest side encoded


def is_autoencoder_file(path: str) -> bool:
    """A lone autoencoder file (tokenizer-only serving): ``*.safetensors``, or ``ae*.pt``."""
    name = os.path.basename(path)
    return os.path.isfile(path) and (name.endswith(".safetensors") or (name.startswith("ae") and name.endswith(".pt")))


class TokenizeError(ValueError):
    """A request the tokenizer cannot honour; ``field`` names the request field, ``allowed`` what is."""

    def __init__(self, message: str, field: str, allowed: Any = None):
        super().__init__(message)
        self.field, self.allowed = field, allowed


@dataclass(frozen=True)
class TokenizerSpec:
    """What the loaded autoencoder takes: down-sampling ``f``, bits per token, token order, sizes."""

    downsample: int
    z_channels: int
    patch_size: int = 1  # the served generator's patch side (its return_tokens order); 1 without one
    sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) allowed; None = multiples of f up to max_side
    max_side: int = DEFAULT_MAX_SIDE
    gan_decoder: bool = False

    def to_info(self) -> dict[str, Any]:
        return {"downsample": self.downsample, "z_channels": self.z_channels, "patch_size": self.patch_size,
                "sizes": None if self.sizes is None else [list(s) for s in self.sizes], "max_side": self.max_side,
                "gan_decoder": self.gan_decoder, "resize_modes": list(RESIZE_MODES)}

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> TokenizerSpec:
        sizes = info.get("sizes")
        return cls(int(info["downsample"]), int(info["z_channels"]), int(info.get("patch_size", 1)),
                   None if sizes is None else tuple((int(h), int(w)) for h, w in sizes),
                   int(info.get("max_side", DEFAULT_MAX_SIDE)), bool(info.get("gan_decoder", False)))

    # ---- sizes ------------------------------------------------------------------------------------------
    def multiple(self, patch_size: int | None = None) -> int:
        return self.downsample * (patch_size or self.patch_size)

    def describe_sizes(self, patch_size: int | None = None) -> list[str] | dict[str, int]:
        if self.sizes is not None:
            return [f"{w}x{h}" for h, w in self.sizes]
        return {"multiple_of": self.multiple(patch_size), "max_side": self.max_side}

    def allows(self, height: int, width: int, patch_size: int | None = None) -> bool:
        m = self.multiple(patch_size)
        if height % m or width % m:
            return False
        if self.sizes is not None:
            return (height, width) in self.sizes
        return 0 < height <= self.max_side and 0 < width <= self.max_side

    def check_size(self, height: int, width: int, field: str, patch_size: int | None = None) -> None:
        if not self.allows(height, width, patch_size):
            raise TokenizeError(f"size {width}x{height} (width x height) is not one this autoencoder takes",
                                field, self.describe_sizes(patch_size))

    def target_size(self, height: int, width: int, patch_size: int | None = None) -> tuple[int, int]:
        """The allowed size an image of ``height × width`` is resized to: itself when allowed, else the
        served size nearest in aspect ratio (then in area), or (tokenizer-only) the nearest multiples of
        ``f · patch_size`` after scaling the longest side down to ``max_side``."""
        if self.allows(height, width, patch_size):
            return height, width
        if self.sizes is not None:
            sizes = [s for s in self.sizes if self.allows(*s, patch_size)]
            if not sizes:
                raise TokenizeError(f"patch_size {patch_size} divides none of the served sizes' token grids",
                                    "patch_size")
            ar, area = math.log(width / height), width * height
            return min(sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - ar), 6), abs(s[0] * s[1] - area)))
        m = self.multiple(patch_size)
        scale = min(1.0, self.max_side / max(height, width))
        snap = lambda v: max(m, min(self.max_side // m * m, int(round(v * scale / m)) * m))  # noqa: E731
        return snap(height), snap(width)

    def check_patch_size(self, patch_size: int | None) -> int:
        ps = self.patch_size if patch_size is None else int(patch_size)
        if ps not in PATCH_SIZES:
            raise TokenizeError(f"patch_size {ps} is not one of {list(PATCH_SIZES)}", "patch_size", list(PATCH_SIZES))
        return ps

    # ---- tokens -----------------------------------------------------------------------------------------
    def token_shape(self, height: int, width: int) -> list[int]:
        return [(height // self.downsample) * (width // self.downsample), self.z_channels]

    def check_tokens(self, data: bytes, token_shape: Any, height: int, width: int) -> tuple[int, int]:
        """Validate packed tokens for an image of ``height × width``; returns ``(N, C)``."""
        expected = self.token_shape(height, width)
        if (not isinstance(token_shape, (list, tuple)) or len(token_shape) != 2
                or [int(v) if isinstance(v, int) and not isinstance(v, bool) else None
                    for v in token_shape] != expected):
            raise TokenizeError(f"token_shape {token_shape!r} does not match a {width}x{height} image of this "
                                f"autoencoder: expected {expected}", "token_shape", expected)
        n, c = expected
        if len(data) != packed_size(n, c):
            raise TokenizeError(f"tokens hold {len(data)} bytes; token_shape {expected} packs into "
                                f"{packed_size(n, c)}", "tokens", {"bytes": packed_size(n, c)})
        pad = packed_size(n, c) * 8 - n * c
        if pad and data[-1] & ((1 << pad) - 1):
            raise TokenizeError("tokens: the padding bits of the last byte are not zero (corrupt packing?)",
                                "tokens")
        return n, c


def packed_size(n: int, c: int) -> int:
    return (n * c + 7) // 8


def pack_bits(tokens) -> bytes:
    """(N, C) +-1 (or 0/1) tokens -> packed bits (1 = +1), row-major, most significant bit first."""
    import numpy as np

    return np.packbits(np.asarray(tokens) > 0).tobytes()


def unpack_bits(data: bytes, n: int, c: int):
    """Packed bits -> (N, C) int8 of +-1 (the inverse of :func:`pack_bits`)."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(data, np.uint8))[: n * c]
    return bits.reshape(n, c).astype(np.int8) * 2 - 1


def b64decode(value: Any, field: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise TokenizeError(f"{field} must be a non-empty base64 string", field)
    if value.startswith("data:"):  # a data URL: data:image/png;base64,...
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TokenizeError(f"{field} is not valid base64: {e}", field) from e


# ---- images -------------------------------------------------------------------------------------------
def probe_image(data: bytes, field: str = "image") -> tuple[str, int, int]:
    """Format and size from the image header (nothing decoded); refuses other formats and huge images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise TokenizeError(f"{field} is not a PNG, JPEG or WebP image ({e})", field, sorted(INPUT_FORMATS.values())
                            ) from e
    if fmt not in INPUT_FORMATS:
        raise TokenizeError(f"{field} is a {fmt} image; send PNG, JPEG or WebP", field,
                            sorted(INPUT_FORMATS.values()))
    if width * height > MAX_INPUT_PIXELS:
        raise TokenizeError(f"{field} is {width}x{height}: more than {MAX_INPUT_PIXELS} pixels", field,
                            {"max_pixels": MAX_INPUT_PIXELS})
    return INPUT_FORMATS[fmt], width, height


def plan_resize(spec: TokenizerSpec, width: int, height: int, resize: str, patch_size: int) -> tuple[int, int]:
    """(target height, target width) of an image under the request's ``resize`` mode."""
    if resize not in RESIZE_MODES:
        raise TokenizeError(f"resize {resize!r} is not one of {list(RESIZE_MODES)}", "resize", list(RESIZE_MODES))
    if resize == "refuse":
        if not spec.allows(height, width, patch_size):
            raise TokenizeError(f"image is {width}x{height}, a size this autoencoder does not take; send one of "
                                "the allowed sizes or set resize to 'fit' or 'crop'", "image",
                                spec.describe_sizes(patch_size))
        return height, width
    return spec.target_size(height, width, patch_size)


def load_rgb(data: bytes, height: int, width: int, resize: str):
    """Decode an image (already probed) to RGB uint8 ``(height, width, 3)``: transparency over white, then
    stretched (``fit``) or scaled to cover and centre-cropped (``crop``) when its size differs."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as src:
            src.load()
            img = src
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TokenizeError(f"image could not be decoded ({e})", "image") from e
    if img.size != (width, height):
        if resize == "crop":
            scale = max(width / img.width, height / img.height)
            w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
            left, top = (w - width) // 2, (h - height) // 2
            img = img.resize((w, h), Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
        else:
            img = img.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def encode_png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
