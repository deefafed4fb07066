"""Images for the vision tests, made here with Pillow and a real TrueType font."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # apt fonts-dejavu-core
LINES = ("Hello aimesh world", "Invoice 2024 total 42")
ORIGIN = (20, 20)
LINE_STEP = 60


def text_image(mode: str = "RGB") -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """LINES printed in black, and where each word was drawn: word -> (x0, y0, x1, y1).
    mode "RGBA": on a transparent background."""
    font = ImageFont.truetype(FONT, 32)
    image = Image.new(mode, (640, 150), (0, 0, 0, 0) if mode == "RGBA" else "white")
    draw = ImageDraw.Draw(image)
    boxes = {}
    for n, line in enumerate(LINES):
        x, y = ORIGIN[0], ORIGIN[1] + n * LINE_STEP
        draw.text((x, y), line, font=font, fill="black")
        for i, word in enumerate(line.split(" ")):
            start = x + draw.textlength(" ".join(line.split(" ")[:i]) + (" " if i else ""), font=font)
            boxes[word] = tuple(round(v) for v in draw.textbbox((start, y), word, font=font))
    return image, boxes


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is one pixel): a
    decompression bomb's header, cheap to make."""
    png = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = png.find(b"IHDR")
    fields = struct.pack(">II", width, height) + png[ihdr + 12:ihdr + 17]
    chunk = b"IHDR" + fields
    return png[:ihdr] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[ihdr + 21:]
