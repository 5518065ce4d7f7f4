"""PNG decoding: 8-bit L/LA/RGB/RGBA, 16-bit gray, palette, bilevel -> float32 gray (H, W).

The declared size is read from the IHDR chunk before Pillow sees the file, so a decompression bomb
(a tiny file declaring 20000 x 20000 pixels) is refused without allocating anything.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import PngImagePlugin

from audit.data.decoded import (
    DEFAULT_MAX_PIXELS,
    PNG_SIGNATURE,
    DecodedImage,
    RejectedInput,
    rgb_to_gray,
)

_COLOR_TYPES = {0: "gray", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}
_GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def read_png_header(data: bytes) -> dict[str, int]:
    """Width, height, bit depth, colour type and interlace method from the IHDR chunk."""
    if len(data) < 33:
        raise RejectedInput("truncated PNG: file ends before the IHDR header")
    length, ctype = struct.unpack(">I4s", data[8:16])
    if ctype != b"IHDR" or length != 13:
        raise RejectedInput("corrupt PNG: first chunk is not a valid IHDR")
    width, height, depth, color, _comp, _filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if width == 0 or height == 0:
        raise RejectedInput(f"corrupt PNG: declared size {width}x{height}")
    if color not in _COLOR_TYPES:
        raise RejectedInput(f"corrupt PNG: unknown colour type {color}")
    return {
        "width": width,
        "height": height,
        "bit_depth": depth,
        "color_type": color,
        "interlace": interlace,
    }


def check_pixel_limit(width: int, height: int, max_pixels: int) -> None:
    """Refuse a declared image size over `max_pixels` (the decompression-bomb guard)."""
    n = int(width) * int(height)
    if n > max_pixels:
        raise RejectedInput(
            f"image too large: declared {width}x{height} = {n} pixels exceeds the limit of "
            f"{max_pixels} pixels (decompression-bomb guard)"
        )


def decode_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode PNG bytes to a float32 gray image; alpha is ignored, colour becomes BT.601 luma."""
    if not data.startswith(PNG_SIGNATURE):
        raise RejectedInput("not a PNG file: missing PNG signature")
    header = read_png_header(data)
    check_pixel_limit(header["width"], header["height"], max_pixels)

    warn: list[str] = []
    try:
        # Pillow's PNG reader itself, not Image.open: our own limit was checked above, and
        # Image.open's softer global one would warn, which only a process-wide warnings filter
        # could silence (not thread-safe: batches decode in threads).
        with PngImagePlugin.PngImageFile(io.BytesIO(data)) as im:
            if im.size != (header["width"], header["height"]):
                raise RejectedInput("corrupt PNG: size disagrees with IHDR")
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                arr = rgb_to_gray(np.asarray(im.convert("RGBA")))
            elif mode in _GRAY_MODES:
                arr = np.asarray(im).astype(np.float32)
            elif mode in ("LA", "La"):
                arr = np.asarray(im)[..., 0].astype(np.float32)
            elif mode in ("RGB", "RGBA", "RGBX", "RGBa"):
                arr = rgb_to_gray(np.asarray(im))
            else:
                raise RejectedInput(f"unsupported PNG pixel mode {mode}")
    except RejectedInput:
        raise
    except (OSError, SyntaxError, EOFError, ValueError, struct.error, MemoryError) as e:
        text = str(e).lower()
        if "truncated" in text or isinstance(e, EOFError) or "ended" in text:
            reason = "truncated PNG: image data ends early"
        else:
            reason = f"corrupt PNG: cannot decode ({type(e).__name__})"
        raise RejectedInput(reason) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a rejected file
        raise RejectedInput(f"corrupt PNG: cannot decode ({type(e).__name__})") from None

    if "A" in mode or "a" in mode:
        warn.append("alpha channel ignored")
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA"):
        warn.append("colour converted to gray (BT.601 luma)")
    meta = {
        "source_format": "png",
        "width": int(arr.shape[1]),
        "height": int(arr.shape[0]),
        "photometric": mode,
        "pixel_spacing": None,
        "bits_stored": int(header["bit_depth"]),
        "png_color_type": _COLOR_TYPES[header["color_type"]],
        "warnings": warn,
    }
    return DecodedImage(pixels=np.ascontiguousarray(arr, dtype=np.float32), meta=meta)
