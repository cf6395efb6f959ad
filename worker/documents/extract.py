"""Prepare stage: document bytes to pages (text, or a normalised image of a scan), or a `DocbatchError`
with a stable reason code. The type comes from the content, not the file name."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from charset_normalizer import from_bytes
from PIL import ExifTags, Image, ImageOps

from schemas.states import DocbatchError, ErrorCode

log = logging.getLogger(__name__)

IMAGE_TYPES = {"image/png", "image/jpeg", "image/tiff"}
# Single-byte encodings often decode the same bytes equally well; business documents that are not
# UTF-8 are most often Windows-1252 or Latin-1, so those win a near tie (a cp1250 text may then need UTF-8).
PREFERRED_ON_TIE = ("cp1252", "latin_1", "iso8859_15")
MAGIC = ((b"%PDF-", "application/pdf"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
         (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


@dataclass(frozen=True)
class ExtractLimits:
    max_image_pixels: int = 100_000_000  # decoded pixels per image or rendered page; more is a bomb
    max_image_side: int = 2048  # page images are scaled down to this longest side
    render_dpi: int = 200  # scanned PDF pages are rendered at this resolution (before the side limit)
    max_pages: int = 2000
    max_stream_bytes: int = 64_000_000  # one PDF stream, decompressed
    min_text_chars: int = 16  # a PDF page with less text than this is treated as a scan


@dataclass
class ExtractedPage:
    text: str
    source: str  # "text" (a text layer or file) or "image" (a scan, text still to come from OCR or a VL model)
    image: Image.Image | None = None
    is_file: bool = False  # the page is the document's file as it is (its pixels are `image`'s, in grey or RGB)


def sniff(data: bytes) -> str:
    """The media type from the first bytes: PDF, PNG, JPEG, TIFF, else text if it decodes as text."""
    head = data[:1024].lstrip(b"\x00\t\r\n ")
    for magic, media_type in MAGIC:
        if head.startswith(magic) or (media_type == "application/pdf" and magic in data[:1024]):
            return media_type
    if _looks_binary(data[:4096]):
        return "application/octet-stream"
    return "text/plain"


def _looks_binary(head: bytes) -> bool:
    """Control bytes other than whitespace (and NUL, which text files sometimes carry) mean binary."""
    controls = sum(1 for b in head if b < 32 and b not in (0, 9, 10, 12, 13))
    return controls > max(2, len(head) // 100)


def extract_pages(data: bytes, limits: ExtractLimits = ExtractLimits()) -> list[ExtractedPage]:
    """Pages of a document in order. Raises `DocbatchError` for input that cannot be used."""
    if not data:
        raise DocbatchError(ErrorCode.EMPTY_FILE, "the file is empty (0 bytes)")
    media_type = sniff(data)
    if media_type == "application/pdf":
        return _pdf_pages(data, limits)
    if media_type in IMAGE_TYPES:
        return _image_pages(data, limits)
    if media_type == "text/plain":
        return [ExtractedPage(_decode_text(data), "text")]
    raise DocbatchError(ErrorCode.UNSUPPORTED_TYPE, "not a PDF, image or text file (content sniffed)")


# -- text -----------------------------------------------------------------------------------------
def _decode_text(data: bytes) -> str:
    """UTF-8 when it is valid, else the least chaotic encoding charset-normalizer finds; NULs removed."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        matches = list(from_bytes(data))
        if not matches:
            raise DocbatchError(ErrorCode.UNSUPPORTED_TYPE, "binary content, not text in any known encoding") from None
        least_chaos = min(m.chaos for m in matches)
        tied = sorted((m for m in matches if m.chaos <= least_chaos + 0.01), key=lambda m: (m.chaos, -m.coherence))
        chosen = next((m for enc in PREFERRED_ON_TIE for m in tied if m.encoding == enc), tied[0])
        log.info("decoded text as %s", chosen.encoding)
        text = str(chosen)
    text = text.replace("\x00", "")
    if not text.strip():
        raise DocbatchError(ErrorCode.NO_TEXT, "the file holds only whitespace")
    return text


# -- images ---------------------------------------------------------------------------------------
def normalise_image(image: Image.Image, max_side: int) -> Image.Image:
    """Upright (EXIF orientation applied), RGB, longest side at most `max_side`."""
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def _image_pages(data: bytes, limits: ExtractLimits) -> list[ExtractedPage]:
    """A page for every frame (a multi-page TIFF has several), normalised. Pixel bombs fail before decoding: each
    frame's size is read from its header and checked against docbatch's `max_image_pixels` (Pillow's own check,
    which would quote its own limits, is off meanwhile). A PNG or JPEG whose pixels normalising leaves as they are
    (grey or RGB, no EXIF turn, within the side limit) is its page as it is (`is_file`): the page is then the
    document's own bytes, stored once and never re-encoded."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            frames = []
            for index in range(getattr(image, "n_frames", 1)):
                if index >= limits.max_pages:
                    raise DocbatchError(ErrorCode.TOO_MANY_PAGES, f"more than {limits.max_pages} frames")
                image.seek(index)
                _check_pixels(image.width, image.height, limits, f"frame {index + 1}" if index else "the image")
                frames.append(normalise_image(image.copy(), limits.max_image_side))
            as_is = (len(frames) == 1 and image.format in ("PNG", "JPEG") and image.mode in ("L", "RGB")
                     and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
                     and max(image.size) <= limits.max_image_side)
            return [ExtractedPage("", "image", frame, is_file=as_is) for frame in frames]
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DocbatchError(ErrorCode.IMAGE_CORRUPT, f"the image cannot be read: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(width: float, height: float, limits: ExtractLimits, what: str) -> None:
    if width * height > limits.max_image_pixels:
        raise DocbatchError(ErrorCode.DECOMPRESSION_BOMB,
                            f"{what} would be {width:,.0f} x {height:,.0f} = {width * height:,.0f} pixels, over "
                            f"max_image_pixels ({limits.max_image_pixels:,})")


# -- PDF ------------------------------------------------------------------------------------------
def _pdf_pages(data: bytes, limits: ExtractLimits) -> list[ExtractedPage]:
    """Text layer per page with pypdf (decompression limits on); pages without one rendered with pdfium."""
    import pypdf
    from pypdf.errors import FileNotDecryptedError, LimitReachedError, PdfReadError

    bounded = dict(zlib_maximum_output_length=limits.max_stream_bytes,
                   lzw_maximum_output_length=limits.max_stream_bytes,
                   run_length_maximum_output_length=limits.max_stream_bytes,
                   array_based_stream_maximum_output_length=limits.max_stream_bytes,
                   stream_decoding_work_maximum_length=limits.max_stream_bytes * 4)
    try:
        with pypdf.apply_configuration(**bounded):
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise DocbatchError(ErrorCode.PDF_ENCRYPTED, "the PDF is encrypted with a password")
            if len(reader.pages) > limits.max_pages:
                raise DocbatchError(ErrorCode.TOO_MANY_PAGES, f"{len(reader.pages)} pages, over {limits.max_pages}")
            texts = [_page_text(page) for page in reader.pages]
    except DocbatchError:
        raise
    except FileNotDecryptedError as e:
        raise DocbatchError(ErrorCode.PDF_ENCRYPTED, f"the PDF is encrypted: {e}") from e
    except LimitReachedError as e:
        raise DocbatchError(ErrorCode.DECOMPRESSION_BOMB, f"a PDF stream decompresses past the limit: {e}") from e
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as e:
        raise DocbatchError(ErrorCode.PDF_CORRUPT, f"the PDF cannot be read: {e}") from e
    if not texts:
        raise DocbatchError(ErrorCode.PDF_CORRUPT, "the PDF has no pages")
    scans = [i for i, text in enumerate(texts) if len(text.strip()) < limits.min_text_chars]
    images = _render_pages(data, scans, limits) if scans else {}
    return [ExtractedPage("", "image", images[i]) if i in images else ExtractedPage(text, "text")
            for i, text in enumerate(texts)]


def _page_text(page) -> str:
    # extract_text() swallows decoding errors; decoding the content first lets the limit errors through.
    contents = page.get_contents()
    if contents is not None:
        contents.get_data()
    return (page.extract_text() or "").replace("\x00", "")


def _render_pages(data: bytes, indices: list[int], limits: ExtractLimits) -> dict[int, Image.Image]:
    """Render the given pages with pdfium at `render_dpi`, never past the pixel or side limits."""
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data, password="")
    except pdfium.PdfiumError as e:
        raise DocbatchError(ErrorCode.PDF_CORRUPT, f"pdfium cannot open the PDF: {e}") from e
    try:
        images = {}
        for index in indices:
            page = document[index]
            width_pt, height_pt = page.get_size()
            scale = min(limits.render_dpi / 72, limits.max_image_side / max(width_pt, height_pt, 1))
            _check_pixels(width_pt * scale, height_pt * scale, limits, f"page {index + 1}, rendered,")
            bitmap = page.render(scale=scale, grayscale=True)
            images[index] = normalise_image(bitmap.to_pil(), limits.max_image_side)
            bitmap.close()
            page.close()
        return images
    finally:
        document.close()
