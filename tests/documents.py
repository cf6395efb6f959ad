"""Document fixtures the tests generate: PDFs (text, scanned, mixed, encrypted, truncated, bombs),
images (multi-page TIFF, EXIF-rotated JPEG, pixel bombs) and texts in legacy encodings."""
from __future__ import annotations

import io
import zlib

from PIL import Image, ImageDraw, ImageFont
from pypdf import PdfWriter
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def text_image(lines: list[str], size: tuple[int, int] = (1240, 1754), font_px: int = 40) -> Image.Image:
    """A white page with black text, as a scanner would see it (A4 at 150 DPI by default)."""
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, font_px) if _has_font() else ImageFont.load_default(font_px)
    for i, line in enumerate(lines):
        draw.text((100, 120 + i * int(font_px * 1.6)), line, fill=0, font=font)
    return image


def _has_font() -> bool:
    import os

    return os.path.exists(FONT)


def pdf(pages: list[str | Image.Image]) -> bytes:
    """A PDF whose pages are text (a real text layer) or images (a scan: no text layer at all)."""
    buffer = io.BytesIO()
    doc = canvas.Canvas(buffer, pagesize=A4)
    width, height = A4
    for page in pages:
        if isinstance(page, Image.Image):
            doc.drawImage(ImageReader(page), 0, 0, width=width, height=height)
        else:
            text = doc.beginText(72, height - 72)
            for line in page.splitlines() or [""]:
                text.textLine(line)
            doc.drawText(text)
        doc.showPage()
    doc.save()
    return buffer.getvalue()


def encrypted_pdf(text: str, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(pdf([text])))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def stream_bomb_pdf(decompressed_bytes: int) -> bytes:
    """A one-page PDF whose content stream is small on disk and `decompressed_bytes` when inflated."""
    stream = zlib.compress(b"q Q " * (decompressed_bytes // 4), 9)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream"]
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer << /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def multipage_tiff(pages: list[Image.Image]) -> bytes:
    out = io.BytesIO()
    pages[0].save(out, format="TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")
    return out.getvalue()


def rotated_jpeg(upright: Image.Image) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view), as phones write."""
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.rotate(90, expand=True).convert("RGB").save(out, format="JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


def pixel_bomb_png(side: int) -> bytes:
    """A PNG that is tiny on disk but `side` x `side` pixels when decoded."""
    out = io.BytesIO()
    Image.new("1", (side, side), 0).save(out, format="PNG", optimize=True)
    return out.getvalue()
