"""Decode one image file safely into an (H, W, 3) uint8 RGB array, or say exactly why not.

Every image dermkit trains on or validates goes through :func:`load_rgb_with_info`, so the
rules below hold everywhere:

- **Fully decoded.** A truncated JPEG/PNG raises :class:`ImageDecodeError` ("truncated
  image"); it is never padded with grey. PIL pads only when the process-wide
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` flag is set, and any library may set it, so the
  decoder here does not trust the flag: it feeds PIL through a reader that records a read
  past the end of the file during decoding, which is exactly what a truncated file causes.
- **Decompression bombs refused** from the header, before any pixel is decoded: more than
  :data:`MAX_IMAGE_PIXELS` pixels is an error, whatever PIL's own global limit is set to
  (PIL's limit is higher and by default only warns).
- **Modes converted, not rejected**: L, 1, P, LA/PA, RGBA/RGBa, CMYK, YCbCr, RGBX and 16-bit
  greyscale (I;16*, I). 16-bit and 32-bit integer images are scaled by their bit depth
  (65535 -> 255, 32768 -> 128), never clipped and never stretched to the image's own range,
  so brightness means the same in every file. ICC profiles are not applied.
- **Transparency is rejected.** An image whose alpha (or palette transparency) is below 255
  anywhere has undefined lesion colours: compositing it onto white or black would invent
  pixels a dermatoscope never saw. So "RGBA image with transparency (alpha < 255 in N
  pixels)" is a rejection, while a fully opaque RGBA image is converted by dropping alpha
  (identical to compositing onto any background).
- **EXIF orientation applied** (``PIL.ImageOps.exif_transpose``), so a phone photo is upright.
- **Cheap checks first.** A file larger than :data:`MAX_IMAGE_BYTES` (64 MiB; set
  ``$DERMKIT_MAX_IMAGE_MB`` or pass ``max_bytes`` to change it) is refused from ``stat``
  before a byte is read. Then, before any pixel is decoded: a JPEG whose header segments
  lead into more than 64 KiB of junk is refused (PIL would scan junk one byte at a time in
  Python, ~2 s per 10 MB), the header's pixel count is checked, and a file far larger than
  its header's dimensions can need (over 16 bytes per pixel + 1 MiB) is refused as padded.
  A 1 GB "JPEG header + zeros" file is thus rejected in microseconds, not minutes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 40_000_000
"""Largest image (width x height) dermkit decodes; larger files are decompression bombs."""

MAX_IMAGE_BYTES = 64 * 2**20
"""Largest image file dermkit reads, checked with ``stat`` before reading. A dermoscopy JPEG
is 0.1-15 MB; 64 MiB also admits a 4000x5000 uncompressed 8-bit RGB TIFF."""
MAX_IMAGE_MB_ENV = "DERMKIT_MAX_IMAGE_MB"
# Most bytes per header pixel a genuine file needs (16-bit RGBA is 8, doubled for encoders
# that expand noise), plus room for metadata, ICC profiles and thumbnails.
_BYTES_PER_PIXEL_BOUND = 16
_METADATA_SLACK = 2**20
# Junk a JPEG may hold between header segments before it counts as not an image.
_JPEG_JUNK_LIMIT = 64 * 2**10

# Modes PIL converts to RGB directly, without an alpha channel to inspect.
_DIRECT_RGB_MODES = frozenset({"RGB", "L", "1", "CMYK", "YCbCr", "RGBX", "P"})
# Modes that carry alpha (PIL's premultiplied "RGBa"/"La" included).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_TIFF_BITS_PER_SAMPLE = 258


class ImageDecodeError(ValueError):
    """An image file cannot be used. ``path`` names the file, ``reason`` says why, briefly."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class _EndWatchingReader(io.BytesIO):
    """In-memory file that records a read past its end while ``armed`` (decoding).

    A complete image never asks for bytes beyond its end while its pixels are decoded; a
    truncated one always does. This is the truncation signal that does not depend on
    PIL's global ``LOAD_TRUNCATED_IMAGES``.
    """

    armed = False
    read_past_end = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if self.armed and size != 0 and not chunk:
            self.read_past_end = True
        return chunk


def max_image_bytes(override: int | None = None) -> int:
    """The file-size limit in bytes: ``override``, else ``$DERMKIT_MAX_IMAGE_MB``, else
    :data:`MAX_IMAGE_BYTES` (read at call time, so tests and users can change it)."""
    if override is not None:
        return int(override)
    env = os.environ.get(MAX_IMAGE_MB_ENV, "").strip()
    if not env:
        return MAX_IMAGE_BYTES
    try:
        megabytes = float(env)
    except ValueError:
        raise ValueError(f"${MAX_IMAGE_MB_ENV} must be a number of MiB, got {env!r}") from None
    if megabytes <= 0:
        raise ValueError(f"${MAX_IMAGE_MB_ENV} must be positive, got {env!r}")
    return int(megabytes * 2**20)


def broken_symlink_reason(path: str | Path) -> str | None:
    """ "broken symlink: target X does not exist" for a dangling link, else None."""
    path = Path(path)
    if not path.is_symlink() or path.exists():
        return None
    target = Path(os.readlink(path))
    shown = target if target.is_absolute() else path.parent / target
    return f"broken symlink: target {shown} does not exist"


def _check_jpeg_junk(path: str | Path, data: bytes) -> None:
    """Refuse a JPEG whose header segments lead into junk instead of a frame header.

    Walks the marker segments by their lengths (C-speed ``find`` over junk) up to the frame
    or scan header; PIL would step through the same junk one byte per Python call.
    """
    pos, junk, end = 2, 0, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            found = data.find(b"\xff", pos)
            skipped = (found if found >= 0 else end) - pos
            junk += skipped
            if junk > _JPEG_JUNK_LIMIT:
                raise ImageDecodeError(
                    path,
                    f"not an image: JPEG header followed by {junk:,} bytes of junk "
                    f"(from byte {pos}) instead of a frame header",
                )
            pos += skipped
            continue
        while pos < end and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= end:
            return
        marker = data[pos]
        pos += 1
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:
            continue  # stuffed zero, TEM, RSTn, SOI: no length field
        if marker in (0xD9, 0xDA) or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return  # frame header (SOFn), scan or end: PIL takes it from here
        pos += int.from_bytes(data[pos : pos + 2], "big")


def _check_plausible_size(path: str | Path, image: Image.Image, n_bytes: int) -> None:
    """Refuse a file far larger than its header's dimensions can need (padding, junk)."""
    width, height = image.size
    most = _BYTES_PER_PIXEL_BOUND * width * height + _METADATA_SLACK
    if n_bytes <= most:
        return
    # Only now count frames (a multi-page TIFF or MPO holds several images): it may seek.
    most *= max(1, int(getattr(image, "n_frames", 1) or 1))
    if n_bytes > most:
        raise ImageDecodeError(
            path,
            f"file is {n_bytes:,} bytes, far more than a {width}x{height} image needs "
            f"(at most {most:,}): padded or not an image",
        )


def _png_without_end(image: Image.Image, data: bytes) -> bool:
    """True for a PNG cut inside its final IEND chunk (pixels complete, file not)."""
    if image.format != "PNG":
        return False
    iend = data.rfind(b"IEND")
    # IEND must come after the last pixel chunk and keep its 4-byte CRC.
    return iend < data.rfind(b"IDAT") or iend + 8 > len(data)


def _check_pixel_limit(
    path: Path, size: tuple[int, int], max_pixels: int | None = None, max_side: int | None = None
) -> None:
    width, height = size
    # Read the module attribute at call time so tests (and users) can lower the limit.
    limit = MAX_IMAGE_PIXELS if max_pixels is None else min(max_pixels, MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise ImageDecodeError(
            path,
            f"decompression bomb: {width}x{height} pixels exceeds limit of {limit:,} pixels",
        )
    if max_side is not None and max(width, height) > max_side:
        raise ImageDecodeError(
            path, f"image too large: {width}x{height} exceeds the {max_side} px side limit"
        )


def _bit_depth(image: Image.Image, values: np.ndarray) -> int:
    """Bit depth of an integer greyscale image (I;16* or I), from the file where it says so."""
    tiff_bits = getattr(image, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE)
    if tiff_bits:
        bits = tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits
        return int(bits)
    if image.mode.startswith("I;16"):
        return 16
    # Mode "I" without a TIFF tag: PIL opens 16-bit PNGs as "I" in some versions.
    return 16 if values.size == 0 or int(values.max()) <= 0xFFFF else 32


def _integer_grey_to_rgb(path: Path, image: Image.Image) -> np.ndarray:
    """(H, W) 16/32-bit integer greyscale -> (H, W, 3) uint8, scaled by the bit depth."""
    values = np.asarray(image)
    if values.size and int(values.min()) < 0:
        raise ImageDecodeError(
            path, f"signed integer image (mode {image.mode}) with negative values"
        )
    depth = _bit_depth(image, values)
    scaled = np.rint(values.astype(np.float64) * (255.0 / (2.0**depth - 1.0)))
    grey = np.clip(scaled, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _reject_transparency(path: Path, mode: str, rgba: Image.Image) -> Image.Image:
    """Return the RGB part of an RGBA image whose alpha is 255 everywhere, else raise."""
    alpha = np.asarray(rgba.getchannel("A"))
    n_transparent = int(np.count_nonzero(alpha < 255))
    if n_transparent:
        raise ImageDecodeError(
            path,
            f"{mode} image with transparency (alpha < 255 in {n_transparent} pixels): "
            "lesion colours undefined",
        )
    return rgba.convert("RGB")


def _to_rgb(path: Path, image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to (H, W, 3) uint8."""
    mode = image.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgb = _reject_transparency(path, mode, image.convert("RGBA"))
    elif mode in _DIRECT_RGB_MODES:
        rgb = image.convert("RGB")
    elif mode.startswith("I;16") or mode == "I":
        return _integer_grey_to_rgb(path, image)
    else:  # F (float), LAB, HSV, ...: no agreed intensity scale or colour space here
        raise ImageDecodeError(path, f"unsupported image mode {mode}")
    return np.asarray(rgb, dtype=np.uint8)


def _decode(path: Path, max_bytes: int | None = None) -> Image.Image:
    """Open, size-check and fully decode ``path``; returns a loaded, upright PIL image.

    The file size is checked with ``stat`` before reading (see :func:`max_image_bytes`).
    """
    try:
        size = path.stat().st_size
        limit = max_image_bytes(max_bytes)
        if size > limit:
            raise ImageDecodeError(
                path,
                f"file too large: {size:,} bytes exceeds the {limit:,}-byte limit "
                f"(${MAX_IMAGE_MB_ENV} raises it)",
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(path, broken_symlink_reason(path) or "file not found") from None
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e.strerror or e})") from e
    return _decode_bytes(path, data)


def _decode_bytes(
    path: str | Path,
    data: bytes,
    max_pixels: int | None = None,
    max_side: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Size-check and fully decode the bytes of one file (``path`` only names it in errors)."""
    if not data:
        raise ImageDecodeError(path, "0-byte file")
    if data.startswith(b"\xff\xd8"):
        _check_jpeg_junk(path, data)
    reader = _EndWatchingReader(data)
    try:
        image = Image.open(reader, formats=formats)
        _check_pixel_limit(path, image.size, max_pixels, max_side)
        _check_plausible_size(path, image, len(data))
        reader.armed = True
        image.load()
        reader.armed = False
        if reader.read_past_end or _png_without_end(image, data):
            raise ImageDecodeError(path, "truncated image")
        with image:
            return ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(path, "not an image (cannot identify)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncation as OSError("image file is truncated ...") or, for PNG
        # chunks cut short, as SyntaxError/EOFError after the reader ran out of bytes.
        if reader.read_past_end or "truncated" in str(e):
            raise ImageDecodeError(path, "truncated image") from e
        raise ImageDecodeError(path, f"cannot decode image ({type(e).__name__}: {e})") from e


def load_rgb_with_info(path: str | Path, max_bytes: int | None = None) -> tuple[np.ndarray, str]:
    """Decode ``path`` to RGB and report the file's original PIL mode.

    ``max_bytes`` overrides the file-size limit (:func:`max_image_bytes`).

    Returns:
        (image, mode): image is (H, W, 3) uint8, upright per EXIF; mode is the mode the file
        was stored in ("RGB", "L", "RGBA", "I;16", "CMYK", "P", ...), so a validation report
        can say "converted RGBA -> RGB".
    Raises:
        ImageDecodeError: 0-byte, truncated, not an image, decompression bomb, transparency,
            unsupported mode.
    """
    path = Path(path)
    image = _decode(path, max_bytes)
    try:
        return _to_rgb(path, image), image.mode
    finally:
        image.close()


def decode_rgb_bytes(
    data: bytes,
    name: str = "upload",
    max_pixels: int | None = None,
    max_side: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, str]:
    """Decode image bytes (e.g. an upload) to RGB with every rule above; (image, mode).

    ``name`` only labels errors (it is never opened). ``max_pixels`` lowers the bomb limit,
    ``max_side`` bounds width and height, both checked from the header before any pixel is
    decoded; ``formats`` restricts the PIL decoders tried (e.g. ("JPEG", "PNG")).
    """
    image = _decode_bytes(name, data, max_pixels, max_side, formats)
    try:
        return _to_rgb(Path(name), image), image.mode
    finally:
        image.close()


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array; raises :class:`ImageDecodeError`."""
    return load_rgb_with_info(path)[0]


def inspect_image(path: str | Path, max_bytes: int | None = None) -> tuple[str | None, str | None]:
    """Fully decode ``path`` and return (reason it is unusable or None, original mode or None)."""
    try:
        return None, load_rgb_with_info(path, max_bytes)[1]
    except ImageDecodeError as e:
        return e.reason, None


def probe_image(path: str | Path) -> str | None:
    """The reason ``path`` is unusable ("0-byte file", "truncated image", ...), else None.

    Decodes every pixel (a header check cannot see truncation), so it costs one full load.
    """
    return inspect_image(path)[0]
