"""Prepare stage: document bytes to page texts, or a `DocbatchError` with a stable reason code."""
from __future__ import annotations

import io
import logging

from charset_normalizer import from_bytes

from schemas.states import DocbatchError, ErrorCode

log = logging.getLogger(__name__)

TEXT_TYPES = {"text/plain", "text/markdown"}
IMAGE_TYPES = {"image/png", "image/jpeg", "image/tiff"}
MEDIA_TYPES = {".txt": "text/plain", ".md": "text/markdown", ".pdf": "application/pdf", ".png": "image/png",
               ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".tif": "image/tiff", ".tiff": "image/tiff"}


def extract_pages(data: bytes, media_type: str) -> list[str]:
    """Text per page (one page for a text file). Raises `DocbatchError` for input that cannot be used."""
    if not data:
        raise DocbatchError(ErrorCode.EMPTY_FILE, "the file is empty (0 bytes)")
    if media_type == "application/pdf":
        return _pdf_pages(data)
    if media_type in TEXT_TYPES:
        return [_decode_text(data)]
    if media_type in IMAGE_TYPES:
        raise DocbatchError(ErrorCode.UNSUPPORTED_TYPE, "image documents need OCR or a vision model, "
                                                        "which this worker does not have yet")
    raise DocbatchError(ErrorCode.UNSUPPORTED_TYPE, f"no extractor for {media_type}")


def _decode_text(data: bytes) -> str:
    """UTF-8 when it is valid, else the encoding charset-normalizer finds; NUL bytes removed."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = _decode_legacy(data)
    text = text.replace("\x00", "")
    if not text.strip():
        raise DocbatchError(ErrorCode.NO_TEXT, "the file holds only whitespace")
    return text


# Single-byte encodings often decode the same bytes equally well; business documents that are not
# UTF-8 are most often Windows-1252 or Latin-1, so those win a tie (a cp1250 text may then need UTF-8).
PREFERRED_ON_TIE = ("cp1252", "latin_1", "iso8859_15")


def _decode_legacy(data: bytes) -> str:
    """The least chaotic decoding charset-normalizer finds; a preferred encoding wins a near tie."""
    matches = list(from_bytes(data))
    if not matches:
        raise DocbatchError(ErrorCode.UNSUPPORTED_TYPE, "binary content, not text in any known encoding")
    least_chaos = min(m.chaos for m in matches)
    tied = sorted((m for m in matches if m.chaos <= least_chaos + 0.01), key=lambda m: (m.chaos, -m.coherence))
    chosen = next((m for enc in PREFERRED_ON_TIE for m in tied if m.encoding == enc), tied[0])
    log.info("decoded text as %s", chosen.encoding)
    return str(chosen)


def _pdf_pages(data: bytes) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    if not data.lstrip()[:5].startswith(b"%PDF-"):
        raise DocbatchError(ErrorCode.PDF_CORRUPT, "not a PDF: the %PDF- header is missing")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocbatchError(ErrorCode.PDF_ENCRYPTED, "the PDF is encrypted with a password")
        texts = [page.extract_text() or "" for page in reader.pages]
    except DocbatchError:
        raise
    except FileNotDecryptedError as e:
        raise DocbatchError(ErrorCode.PDF_ENCRYPTED, f"the PDF is encrypted: {e}") from e
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
        raise DocbatchError(ErrorCode.PDF_CORRUPT, f"the PDF cannot be read: {e}") from e
    if not texts:
        raise DocbatchError(ErrorCode.PDF_CORRUPT, "the PDF has no pages")
    if not any(t.strip() for t in texts):
        raise DocbatchError(ErrorCode.PDF_NO_TEXT, "no page has a text layer (scans need OCR, not yet supported)")
    return texts
