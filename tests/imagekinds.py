"""Generators of hostile and odd image files for the bad-input tests (made at test time from a
real photo; nothing is committed)."""

from __future__ import annotations

import io
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


def write_bad_files(src: Path, out: Path) -> dict[str, Path]:
    """Write one file per kind of undecodable input; returns kind -> path."""
    out.mkdir(parents=True, exist_ok=True)
    jpeg = src.read_bytes()
    files = {
        "truncated_jpeg": (out / "truncated.jpg", jpeg[: len(jpeg) // 2]),
        "zero_bytes": (out / "empty.jpg", b""),
        "text_as_jpg": (out / "notes.jpg", b"this is a text file, not a photo\n" * 20),
        "random_bytes": (out / "noise.png", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "html_as_png": (out / "page.png", b"<html><body>hi</body></html>"),
        "bomb_png": (out / "bomb.png", bomb_png()),
        "jpeg_header_only": (out / "header.jpg", jpeg[:200]),
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
    (out / "a_directory.jpg").mkdir(exist_ok=True)
    paths["directory"] = out / "a_directory.jpg"
    paths["missing"] = out / "does_not_exist.jpg"
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
    return res


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()
