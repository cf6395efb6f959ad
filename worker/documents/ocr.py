"""OCR of page images with Tesseract (through pytesseract), for text-only models."""
from __future__ import annotations

from PIL import Image

from schemas.states import DocbatchError, ErrorCode


def ocr_image(image: Image.Image, *, lang: str = "eng", timeout_s: float = 120) -> str:
    """The text Tesseract reads on `image`. Raises `DocbatchError` (`ocr_failed`, `extract_timeout`)."""
    import pytesseract

    try:
        return pytesseract.image_to_string(image, lang=lang, timeout=timeout_s)
    except pytesseract.TesseractNotFoundError as e:
        raise DocbatchError(ErrorCode.OCR_FAILED, "tesseract is not installed (apt-get install tesseract-ocr)") from e
    except pytesseract.TesseractError as e:
        raise DocbatchError(ErrorCode.OCR_FAILED, f"tesseract failed: {e}") from e
    except RuntimeError as e:  # pytesseract's timeout
        raise DocbatchError(ErrorCode.EXTRACT_TIMEOUT, f"OCR took longer than {timeout_s:.0f} s") from e
