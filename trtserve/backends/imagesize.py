"""An encoded image's width and height, read from its header without decoding it.

A 1 MB PNG can hold a 20,000 x 20,000 image: decoding it takes 1.2 GB for the pixels
alone, more for the decoder's buffers, and seconds of CPU.  DecodeMat and DecodeTensor
read the dimensions here first and refuse images over their ``max_pixels``.

Formats: JPEG (the first SOF marker, skipping APPn segments such as an EXIF thumbnail),
PNG, BMP, GIF, WebP (VP8, VP8L, VP8X), TIFF (the first IFD), PNM/PAM/PFM, JPEG 2000
(JP2 boxes or a raw codestream), AVIF, Sun raster and Radiance HDR: what OpenCV decodes.
``image_size`` returns None for anything else, or for a header too short to hold the size.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Callable

Size = tuple[int, int]  # (width, height)

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC are not frames
_JPEG_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM


def _jpeg(data: bytes | memoryview) -> Size | None:
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        pos += 2
        if marker in _JPEG_NO_LENGTH:
            continue
        (length,) = struct.unpack_from(">H", data, pos)
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += length
    return None


def _png(data: bytes) -> Size | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _bmp(data: bytes) -> Size | None:
    if len(data) < 26:
        return None
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height is a top-down bitmap


def _gif(data: bytes) -> Size | None:
    return struct.unpack_from("<HH", data, 6) if len(data) >= 10 else None


def _webp(data: bytes) -> Size | None:
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        b0, b1, b2, b3 = data[21:25]
        return 1 + (((b1 & 0x3F) << 8) | b0), 1 + (((b3 & 0x0F) << 10) | (b2 << 2) | ((b1 & 0xC0) >> 6))
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    return None


def _tiff(data: bytes | memoryview) -> Size | None:
    order = "<" if bytes(data[:2]) == b"II" else ">"
    if len(data) < 8:
        return None
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack_from(order + "H", data, ifd)
    sizes: dict[int, int] = {}
    for i in range(min(count, 512)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(data):
            break
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            sizes[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, entry + 8)[0]
    return (sizes[256], sizes[257]) if len(sizes) == 2 else None


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*(\S+)")


def _pnm(data: bytes) -> Size | None:
    head = data
    if head[:2] == b"P7":  # PAM: WIDTH and HEIGHT lines
        width, height = re.search(rb"\nWIDTH\s+(\d+)", head), re.search(rb"\nHEIGHT\s+(\d+)", head)
        return (int(width.group(1)), int(height.group(1))) if width and height else None
    tokens: list[int] = []
    pos = 2
    while len(tokens) < 2:
        match = _PNM_TOKEN.match(head, pos)
        if match is None or not match.group(1).isdigit():
            return None
        tokens.append(int(match.group(1)))
        pos = match.end()
    return tokens[0], tokens[1]


def _jp2(data: bytes) -> Size | None:
    at = data.find(b"ihdr")  # the image header box (in the first 4 KiB): height, width
    if at < 0 or at + 12 > len(data):
        return None
    height, width = struct.unpack_from(">II", data, at + 4)
    return width, height


def _j2k(data: bytes) -> Size | None:
    if len(data) < 24 or data[2:4] != b"\xff\x51":  # SIZ must follow SOC
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, 8)
    return max(0, xsiz - xo), max(0, ysiz - yo)


def _avif(data: bytes) -> Size | None:
    at = data.find(b"ispe")  # the image spatial extents property: version/flags, width, height
    if at < 0 or at + 16 > len(data):
        return None
    return struct.unpack_from(">II", data, at + 8)


def _sun(data: bytes) -> Size | None:
    return struct.unpack_from(">II", data, 4) if len(data) >= 12 else None


def _hdr(data: bytes) -> Size | None:
    match = re.search(rb"\n([-+])([YX]) (\d+) ([-+])([YX]) (\d+)", data)
    if match is None:
        return None
    first, second = int(match.group(3)), int(match.group(6))
    return (second, first) if match.group(2) == b"Y" else (first, second)


# JPEG and TIFF are walked to wherever their size is (ICC profiles in APPn segments can
# take megabytes; a TIFF's first IFD is often at the end): they read the whole image.
_WALKED: list[tuple[bytes, Callable[[bytes | memoryview], Size | None]]] = [
    (b"\xff\xd8", _jpeg),
    (b"II*\x00", _tiff),
    (b"MM\x00*", _tiff),
]
# The others keep their size up front: they read the first 4 KiB.
_HEADED: list[tuple[bytes, Callable[[bytes], Size | None]]] = [
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"BM", _bmp),
    (b"GIF87a", _gif),
    (b"GIF89a", _gif),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", _jp2),
    (b"\xff\x4f\xff\x51", _j2k),
    (b"\x59\xa6\x6a\x95", _sun),
    (b"#?RADIANCE", _hdr),
    (b"#?RGBE", _hdr),
]
_HEADED += [(b"P" + bytes([c]), _pnm) for c in b"1234567fF"]


def image_size(data: bytes | bytearray | memoryview) -> Size | None:
    """(width, height) from an encoded image's header, or None when the format is not one
    of the above or the header is cut short."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    head = bytes(view[:4096])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head)
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"mif1", b"msf1"):
        return _avif(head)
    try:
        for signature, walker in _WALKED:
            if head.startswith(signature):
                return walker(view)
        for signature, reader in _HEADED:
            if head.startswith(signature):
                return reader(head)
    except (struct.error, ValueError, IndexError):
        return None
    return None
