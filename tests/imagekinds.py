"""Generators of hostile and odd image files for the bad-input tests (made at test time from a
real photo; nothing is committed).

* :func:`write_bad_files`: files no decoder should accept (refused with ``InvalidImageError``).
* :func:`write_special_files`: things that are not regular files, or links (FIFO, devices,
  symbolic links to a system file, a dangling link, a link loop, a link to a real image).
* :func:`write_odd_valid_files`: valid but unusual images that must be accepted and decoded right.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * w
    idat = zlib.compress(row * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def png_bad_crc(im: Image.Image) -> bytes:
    """A PNG whose IHDR chunk CRC is wrong (the header is corrupt)."""
    data = bytearray(png_bytes(im))
    data[29] ^= 0xFF  # 8-byte signature + 4 length + 4 "IHDR" + 13 data = CRC at 29..32
    return bytes(data)


def png_text_bomb(im: Image.Image, size: int = 8 << 20) -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to ``size`` bytes (a zip bomb in metadata)."""
    data = png_bytes(im)
    ztxt = _png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * size, 9))
    return data[:33] + ztxt + data[33:]


def jpeg_huge_header(jpeg: bytes, w: int = 65000, h: int = 65000) -> bytes:
    """A real JPEG whose frame header (SOF) claims ``w`` x ``h`` pixels."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        k = data.find(marker)
        if k > 0:
            data[k + 5 : k + 9] = struct.pack(">HH", h, w)
            return bytes(data)
    raise ValueError("no SOF marker found")


def jpeg_corrupt_exif(im: Image.Image) -> bytes:
    """A valid JPEG with an APP1 EXIF block whose IFD offsets point past its end (still decodable:
    the pixels are intact; only the metadata is garbage)."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    payload = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 10
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]


def write_bad_files(src: Path, out: Path) -> dict[str, Path]:
    """Write one file per kind of undecodable input; returns kind -> path."""
    out.mkdir(parents=True, exist_ok=True)
    jpeg = src.read_bytes()
    small_png = png_bytes(Image.open(src).convert("RGB").resize((64, 48)))
    files = {
        "truncated_jpeg": (out / "truncated.jpg", jpeg[: len(jpeg) // 2]),
        "zero_bytes": (out / "empty.jpg", b""),
        "text_as_jpg": (out / "notes.jpg", b"this is a text file, not a photo\n" * 20),
        "random_bytes": (out / "noise.png", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "html_as_png": (out / "page.png", b"<html><body>hi</body></html>"),
        "bomb_png": (out / "bomb.png", bomb_png()),
        "jpeg_header_only": (out / "header.jpg", jpeg[:200]),
        "huge_header_jpeg": (out / "huge_header.jpg", jpeg_huge_header(jpeg)),
        "png_bad_crc": (out / "bad_crc.png", png_bad_crc(Image.open(src).convert("RGB").resize((32, 24)))),
        "truncated_png": (out / "truncated.png", small_png[: len(small_png) // 2]),
        "png_text_bomb": (out / "text_bomb.png", png_text_bomb(Image.new("RGB", (8, 8), "red"))),
        "svg_as_png": (out / "drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
    }
    paths = {}
    for kind, (p, data) in files.items():
        p.write_bytes(data)
        paths[kind] = p
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    frames[0].save(out / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    paths["animated_gif"] = out / "anim.gif"
    frames[0].save(out / "pages.tif", save_all=True, append_images=frames[1:])
    paths["multipage_tiff"] = out / "pages.tif"
    frames[0].save(out / "anim.png", save_all=True, append_images=frames[1:])
    paths["animated_png"] = out / "anim.png"
    (out / "a_directory.jpg").mkdir(exist_ok=True)
    paths["directory"] = out / "a_directory.jpg"
    paths["missing"] = out / "does_not_exist.jpg"
    return paths


def write_special_files(src: Path, out: Path) -> dict[str, Path]:
    """Write non-regular files and links; returns kind -> path.  ``symlink_to_image`` points to a
    copy of ``src`` (valid); every other kind must be refused without reading forever."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    fifo = out / "fifo.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    paths["fifo"] = fifo
    paths["dev_zero"] = Path("/dev/zero")
    paths["dev_urandom"] = Path("/dev/urandom")
    links = {
        "symlink_to_passwd": (out / "passwd.jpg", "/etc/passwd"),
        "dangling_symlink": (out / "dangling.jpg", str(out / "gone.jpg")),
        "symlink_loop": (out / "loop.jpg", str(out / "loop.jpg")),
        "symlink_to_dev_zero": (out / "zero.jpg", "/dev/zero"),
    }
    real = out / "real_target.jpg"
    real.write_bytes(Path(src).read_bytes())
    links["symlink_to_image"] = (out / "linked.jpg", str(real))
    for kind, (link, target) in links.items():
        if not link.is_symlink():
            link.symlink_to(target)
        paths[kind] = link
    return paths


def write_odd_valid_files(src: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """Write valid but unusual images of the same photo; returns kind -> (path, expected mode)."""
    out.mkdir(parents=True, exist_ok=True)
    im = Image.open(src).convert("RGB").resize((96, 64))
    res = {}
    im.convert("CMYK").save(out / "cmyk.jpg", quality=95)
    res["cmyk_jpeg"] = (out / "cmyk.jpg", "RGB")
    grey16 = (np.asarray(im.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(grey16).save(out / "grey16.png")  # mode I;16
    res["grey16_png"] = (out / "grey16.png", "RGB")
    pal = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(out / "palette_t.png", transparency=0)
    res["palette_transparency_png"] = (out / "palette_t.png", "RGBA")
    rgba = im.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :20, 3] = 0
    Image.fromarray(a).save(out / "alpha.png")
    res["rgba_png"] = (out / "alpha.png", "RGBA")
    im.convert("LA").save(out / "la.png")
    res["la_png"] = (out / "la.png", "RGBA")
    im.convert("1").save(out / "bilevel.png")
    res["bilevel_png"] = (out / "bilevel.png", "RGB")
    im.convert("L").save(out / "grey.jpg")
    res["grey_jpeg"] = (out / "grey.jpg", "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(out / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    res["exif_rotated_jpeg"] = (out / "exif_rotated.jpg", "RGB")
    im.save(out / "photo.webp")
    res["webp"] = (out / "photo.webp", "RGB")
    (out / "corrupt_exif.jpg").write_bytes(jpeg_corrupt_exif(im))
    res["corrupt_exif_jpeg"] = (out / "corrupt_exif.jpg", "RGB")
    return res


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()
