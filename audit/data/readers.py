"""Read one chest X-ray file (PNG or DICOM) into a float32 gray image plus technical metadata.

`read_image(path)` is the single entry point. The file type is sniffed from its bytes (the PNG
signature, or ``b"DICM"`` at offset 128 of a DICOM Part 10 file), never from its extension, and
never by forcing pydicom to parse arbitrary bytes.

Every way a file can be bad ends in `RejectedInput(reason)`: unknown content, truncated or corrupt
data, declared sizes over the decompression-bomb limit, DICOM objects that are not radiographs,
images that decode to a constant. Reasons are written by this package, never copied from a
decoder's message or a header, so no patient identifier can travel in one.

Output convention (see docs/interfaces.md): ``pixels`` is a float32 ``(H, W)`` array where larger
means brighter, i.e. bone is bright; ``meta`` holds only whitelisted technical fields.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from audit.data.decoded import (
    DEFAULT_MAX_PIXELS,
    DICOM_MAGIC,
    DICOM_MAGIC_OFFSET,
    PNG_SIGNATURE,
    DecodedImage,
    RejectedInput,
    check_not_empty,
)

SNIFF_BYTES = DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)

# Formats that are recognised only to give a clearer reason when they are refused.
_OTHER_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
}


def sniff_format(head: bytes) -> str | None:
    """Return ``"png"``, ``"dicom"`` or ``None`` from the first `SNIFF_BYTES` bytes of a file."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head[DICOM_MAGIC_OFFSET:SNIFF_BYTES] == DICOM_MAGIC:
        return "dicom"
    return None


def sniff_file(path: str | os.PathLike[str]) -> str | None:
    """`sniff_format` of a file on disk (reads 132 bytes); ``None`` when unreadable."""
    try:
        with open(path, "rb") as f:
            return sniff_format(f.read(SNIFF_BYTES))
    except OSError:
        return None


def _describe_unknown(head: bytes) -> str:
    if not head:
        return "empty file (0 bytes)"
    for sig, name in _OTHER_SIGNATURES.items():
        if head.startswith(sig):
            return f"not a PNG or DICOM file: content is {name}"
    if len(head) < SNIFF_BYTES and head.startswith(b"\x89PN"):
        return "truncated PNG: file ends inside the signature"
    return "not a PNG or DICOM file: no PNG signature and no DICM marker at byte 128"


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a PNG or DICOM file; raise `RejectedInput` for anything unusable."""
    return decode_bytes(read_file_bytes(path, max_pixels), max_pixels=max_pixels)


def max_file_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Files larger than this are not even read (8 bytes per allowed pixel, at least 64 MiB)."""
    return max(8 * max_pixels, 64 << 20)


def read_file_bytes(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The bytes of a file, refusing files over `max_file_bytes` before reading them."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_file_bytes(max_pixels):
            raise RejectedInput(
                f"file too large: {size} bytes exceeds {max_file_bytes(max_pixels)} bytes"
            )
        return p.read_bytes()
    except IsADirectoryError:
        raise RejectedInput("not a file: is a directory") from None
    except OSError as e:
        raise RejectedInput(f"cannot read file ({type(e).__name__})") from None


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the bytes of a whole PNG or DICOM file (the work behind `read_image`)."""
    kind = sniff_format(data[:SNIFF_BYTES])
    if kind == "png":
        from audit.data.png import decode_png

        image = decode_png(data, max_pixels=max_pixels)
    elif kind == "dicom":
        from audit.data.dicom import decode_dicom

        image = decode_dicom(data, max_pixels=max_pixels)
    else:
        raise RejectedInput(_describe_unknown(data[:SNIFF_BYTES]))
    check_not_empty(image.pixels)
    return image


def inspect_file(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Hash and decode one file without returning its pixels (what an ingest worker does).

    Returns ``{"sha256": hex | None, "meta": dict}`` for a usable image, or
    ``{"sha256": hex | None, "reason": str}`` for a rejected one. Never raises for bad data.
    """
    try:
        data = read_file_bytes(path, max_pixels)
    except RejectedInput as e:
        return {"sha256": None, "reason": e.reason}
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = decode_bytes(data, max_pixels=max_pixels)
    except RejectedInput as e:
        return {"sha256": sha, "reason": e.reason}
    except Exception as e:  # noqa: BLE001 - a reader bug must not stop an ingest run
        return {"sha256": sha, "reason": f"unexpected reader error ({type(e).__name__})"}
    return {"sha256": sha, "meta": image.meta}
