"""Cheap checks of an uploaded image before any pixel is decoded: its format and its size.

:data:`IMAGE_FORMATS` is the one list of formats ``dermkit serve`` accepts; the server
sniffs uploads with it and serves it in ``GET /config``, and the web page sniffs a chosen
file with the same magic bytes before it decodes or uploads anything, so page and API
accept exactly the same files.

:func:`probe_header` reads the width and height from the format's own header with a
bounded number of small reads (a few KiB at most, whatever the file size): a JPEG's
markers are walked segment by segment to its frame header (SOF), a PNG's IHDR and a WebP's
VP8/VP8L/VP8X header sit at fixed offsets. This is what makes junk cheap to refuse: PIL's
``Image.open`` scans a JPEG header followed by 10 MB of zeros byte by byte in Python
(about 1.6 s of CPU), this walker gives up after :data:`MAX_JPEG_GAP` bytes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class ImageFormat:
    """An accepted format: its PIL name, MIME type and signature ((offset, bytes), ...)."""

    name: str
    mime: str
    magic: tuple[tuple[int, bytes], ...]

    def matches(self, head: bytes) -> bool:
        return all(head[o : o + len(m)] == m for o, m in self.magic)

    def to_json(self) -> dict:
        """For the page: ``{"name", "mime", "magic": [[offset, "hex"], ...]}``."""
        return {
            "name": self.name,
            "mime": self.mime,
            "magic": [[o, m.hex()] for o, m in self.magic],
        }


IMAGE_FORMATS = (
    ImageFormat("JPEG", "image/jpeg", ((0, b"\xff\xd8\xff"),)),
    ImageFormat("PNG", "image/png", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ImageFormat("WEBP", "image/webp", ((0, b"RIFF"), (8, b"WEBP"))),
)
SNIFF_BYTES = 16  # enough for every signature above
UNSUPPORTED_MESSAGE = "not a JPEG, PNG or WebP image (by content)"
# Bytes a JPEG may carry between two segments before it is refused (libjpeg tolerates
# such junk with a warning; real files have none or a few padding bytes).
MAX_JPEG_GAP = 4096
MAX_JPEG_SEGMENTS = 1024
# JPEG frame headers (SOF0..SOF15) except DHT (C4), JPG (C8) and DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..7: markers without a length


class ProbeError(ValueError):
    """The header says the upload is unusable; ``kind`` is "unsupported" or "invalid"."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class HeaderInfo:
    format: str  # a name of IMAGE_FORMATS
    width: int
    height: int


def sniff_image_type(data: bytes) -> str | None:
    """The accepted format's name from the first bytes ("JPEG", "PNG", "WEBP"), else None."""
    for fmt in IMAGE_FORMATS:
        if fmt.matches(data[:SNIFF_BYTES]):
            return fmt.name
    return None


def probe_header(f: BinaryIO | bytes) -> HeaderInfo:
    """Format and size of the image in ``f`` (read from its current start, then rewound).

    Raises :class:`ProbeError`: "unsupported" when no accepted signature matches,
    "invalid" when the header is malformed or ends before it gives the size.
    """
    f = io.BytesIO(f) if isinstance(f, bytes | bytearray) else f
    f.seek(0)
    try:
        fmt = sniff_image_type(f.read(SNIFF_BYTES))
        if fmt is None:
            raise ProbeError("unsupported", UNSUPPORTED_MESSAGE)
        width, height = {"JPEG": _jpeg_size, "PNG": _png_size, "WEBP": _webp_size}[fmt](f)
    finally:
        f.seek(0)
    if width < 1 or height < 1:
        raise ProbeError("invalid", f"{fmt} header gives an empty image ({width}x{height})")
    return HeaderInfo(fmt, width, height)


def _read(f: BinaryIO, at: int, n: int, what: str) -> bytes:
    f.seek(at)
    data = f.read(n)
    if len(data) < n:
        raise ProbeError("invalid", f"truncated image: the file ends inside the {what}")
    return data


def _png_size(f: BinaryIO) -> tuple[int, int]:
    chunk = _read(f, 8, 16, "PNG header")  # length, "IHDR", width, height
    length, kind, width, height = struct.unpack(">I4sII", chunk)
    if kind != b"IHDR" or length != 13:
        raise ProbeError("invalid", "not a valid PNG: the first chunk is not IHDR")
    return width, height


def _webp_size(f: BinaryIO) -> tuple[int, int]:
    kind = _read(f, 12, 4, "WebP header")
    if kind == b"VP8 ":  # lossy: frame tag (3), start code 9d 01 2a, 14-bit sides
        head = _read(f, 20, 10, "WebP VP8 header")
        if head[3:6] != b"\x9d\x01\x2a":
            raise ProbeError("invalid", "not a valid WebP: bad VP8 start code")
        width, height = struct.unpack("<HH", head[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1 and height-1
        head = _read(f, 20, 5, "WebP VP8L header")
        if head[0] != 0x2F:
            raise ProbeError("invalid", "not a valid WebP: bad VP8L signature")
        bits = int.from_bytes(head[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        head = _read(f, 24, 6, "WebP VP8X header")
        width = int.from_bytes(head[0:3], "little") + 1
        return width, int.from_bytes(head[3:6], "little") + 1
    raise ProbeError("invalid", f"not a valid WebP: unknown chunk {kind!r}")


def _jpeg_size(f: BinaryIO) -> tuple[int, int]:
    """Walk the marker segments after SOI to the first frame header (SOF).

    Each step reads one window of at most ``MAX_JPEG_GAP + 2`` bytes, and there are at
    most ``MAX_JPEG_SEGMENTS`` steps: a few MiB of reads in the worst case, ~KiB usually.
    """
    truncated = "truncated image: the JPEG ends before its frame header"
    pos = 2  # after SOI (FF D8)
    for _ in range(MAX_JPEG_SEGMENTS):
        f.seek(pos)
        window = f.read(MAX_JPEG_GAP + 2)
        start = window.find(b"\xff")
        if start < 0 or start > MAX_JPEG_GAP:  # junk where a marker should be
            if len(window) < MAX_JPEG_GAP + 2:
                where = f"between byte {pos} and the end of the file"
            else:
                where = f"within {MAX_JPEG_GAP} bytes of byte {pos}"
            raise ProbeError("invalid", f"not a valid JPEG: no marker {where}")
        rest = window[start:].lstrip(b"\xff")  # a marker may be preceded by fill bytes
        if not rest:
            raise ProbeError(
                "invalid",
                truncated
                if len(window) < MAX_JPEG_GAP + 2
                else f"not a valid JPEG: only fill bytes after byte {pos}",
            )
        code_at = pos + len(window) - len(rest)
        code = rest[0]
        if code in _STANDALONE or code == 0x00:  # no length; 0x00 is a stuffed byte: junk
            pos = code_at + 1
            continue
        if code == 0xD9:
            raise ProbeError("invalid", "not a valid JPEG: it ends (EOI) before a frame header")
        (length,) = struct.unpack(">H", _read(f, code_at + 1, 2, "JPEG segment length"))
        if length < 2:
            raise ProbeError(
                "invalid", f"not a valid JPEG: segment length {length} at byte {code_at - 1}"
            )
        if code in _SOF:  # length, precision (1), height (2), width (2)
            height, width = struct.unpack(">HH", _read(f, code_at + 4, 4, "JPEG frame header"))
            return width, height
        pos = code_at + 1 + length
    raise ProbeError(
        "invalid", f"not a valid JPEG: no frame header in {MAX_JPEG_SEGMENTS} segments"
    )
