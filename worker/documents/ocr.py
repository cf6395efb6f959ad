"""OCR of page images with Tesseract (through pytesseract), for text-only models: the page is turned upright
first (Tesseract's orientation and script detection, OSD), and the words' confidence is kept, so that a page
Tesseract was unsure of puts a warning on the answer (`ocr_low_confidence`) instead of passing as clean."""
from __future__ import annotations

import csv
import functools
import io
import logging
import shutil
from dataclasses import dataclass
from typing import Any

from PIL import Image

from schemas.states import DocbatchError, ErrorCode

log = logging.getLogger(__name__)
# OSD's orientation confidence (Tesseract's own units) from which a page is turned without a second look: a page of
# text turned by a quarter scored 5 to 7 here, an upright one as much for "0"; a page of three lines scored 1.3
# for the right turn. Under it, a text-only model's page is read both ways and the surer reading kept.
MIN_ORIENTATION_CONFIDENCE = 2.0
LOW_CONFIDENCE_CODE = "ocr_low_confidence"
NOT_INSTALLED = "tesseract is not installed (apt-get install tesseract-ocr)"


@dataclass(frozen=True)
class OcrText:
    text: str
    confidence: float | None  # mean word confidence, 0 to 100, weighted by word length; None: no word read


def upright(image: Image.Image, *, timeout_s: float = 120) -> tuple[Image.Image, int]:
    """The page turned upright as Tesseract's OSD sees it, and the clockwise degrees it was turned by (0 when
    OSD is unsure, finds too little text, or Tesseract is missing): what a vision model gets."""
    turn, confidence = _orientation(image, timeout_s)
    if not turn or confidence < MIN_ORIENTATION_CONFIDENCE:
        return image, 0
    return _turned(image, turn), turn


def read_upright(image: Image.Image, *, lang: str = "eng", timeout_s: float = 120) -> tuple[Image.Image, OcrText, int]:
    """A page as a text-only model gets it: turned upright, read, and the clockwise degrees it was turned by. When
    OSD suggests a turn without being sure (a page of a few lines), the page is read both ways and the reading
    with the surer words kept. Raises `DocbatchError` as `ocr_image` does."""
    turn, confidence = _orientation(image, timeout_s)
    if not turn:
        return image, ocr_image(image, lang=lang, timeout_s=timeout_s), 0
    turned = _turned(image, turn)
    read = ocr_image(turned, lang=lang, timeout_s=timeout_s)
    if confidence >= MIN_ORIENTATION_CONFIDENCE:
        return turned, read, turn
    as_it_lies = ocr_image(image, lang=lang, timeout_s=timeout_s)
    if (as_it_lies.confidence or 0.0) >= (read.confidence or 0.0):
        return image, as_it_lies, 0
    return turned, read, turn


def _orientation(image: Image.Image, timeout_s: float) -> tuple[int, float]:
    """OSD's clockwise turn (0, 90, 180, 270) and its confidence; (0, 0.0) when it cannot tell (too little text)
    or Tesseract is missing (OCR then says so)."""
    import pytesseract

    if _tesseract_missing():  # pytesseract would write the page to a file before it finds out (35 ms a page)
        return 0, 0.0
    try:
        osd = pytesseract.image_to_osd(image, output_type=pytesseract.Output.DICT, timeout=timeout_s)
    except (pytesseract.TesseractError, pytesseract.TesseractNotFoundError) as e:
        log.debug("no orientation detected (%s); the page is read as it is", str(e).strip())
        return 0, 0.0
    except RuntimeError as e:  # pytesseract's timeout
        raise DocbatchError(ErrorCode.EXTRACT_TIMEOUT, f"orientation detection took longer than {timeout_s:.0f} s") from e
    return int(osd.get("rotate", 0)) % 360, float(osd.get("orientation_conf", 0.0))


def _turned(image: Image.Image, turn: int) -> Image.Image:
    return image.rotate(-turn, expand=True, fillcolor="white")  # PIL turns counter-clockwise, OSD's turn is clockwise


def ocr_image(image: Image.Image, *, lang: str = "eng", timeout_s: float = 120) -> OcrText:
    """The text Tesseract reads on `image` (as it is: see `upright`), with its words' mean confidence, from one
    Tesseract run. Raises `DocbatchError` (`ocr_failed`, `extract_timeout`)."""
    import pytesseract

    if _tesseract_missing():
        raise DocbatchError(ErrorCode.OCR_FAILED, NOT_INSTALLED)
    try:
        text, tsv = pytesseract.run_and_get_multiple_output(image, extensions=["txt", "tsv"], lang=lang,
                                                            timeout=timeout_s)
    except pytesseract.TesseractNotFoundError as e:
        raise DocbatchError(ErrorCode.OCR_FAILED, NOT_INSTALLED) from e
    except pytesseract.TesseractError as e:
        raise DocbatchError(ErrorCode.OCR_FAILED, f"tesseract failed: {e}") from e
    except RuntimeError as e:  # pytesseract's timeout
        raise DocbatchError(ErrorCode.EXTRACT_TIMEOUT, f"OCR took longer than {timeout_s:.0f} s") from e
    return OcrText(text, _mean_confidence(tsv))


def _tesseract_missing() -> bool:
    import pytesseract

    return _missing(pytesseract.pytesseract.tesseract_cmd)


@functools.lru_cache(maxsize=None)
def _missing(command: str) -> bool:
    """True when Tesseract's `command` is not on this host: said once a process, since every page then goes to a
    vision model as it lies."""
    if shutil.which(command):
        return False
    log.warning("%s: page images are not turned upright, and scans cannot be read for a text-only model", NOT_INSTALLED)
    return True


def _mean_confidence(tsv: str) -> float | None:
    """Tesseract's TSV: one row per layout element; words carry their text and a confidence (-1 for the rest)."""
    weighted, chars = 0.0, 0
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        word = (row.get("text") or "").strip()
        try:
            confidence = float(row.get("conf") or -1)
        except ValueError:
            continue
        if word and confidence >= 0:
            weighted += confidence * len(word)
            chars += len(word)
    return weighted / chars if chars else None


def ocr_warnings(pages: list[Any], min_confidence: float) -> list[dict[str, str]]:
    """The result's warning when OCR was unsure of some of the document's pages (`StoredPage`s whose
    `ocr_confidence` is under `min_confidence`), else none."""
    unsure = [(page_no, page.ocr_confidence) for page_no, page in enumerate(pages, start=1)
              if page.ocr_confidence is not None and page.ocr_confidence < min_confidence]
    if not unsure:
        return []
    numbers = ", ".join(str(page_no) for page_no, _ in unsure)
    scores = ", ".join(f"{confidence:.0f}" for _, confidence in unsure)
    pages_said = f"page {numbers}" if len(unsure) == 1 else f"pages {numbers}"
    return [{"code": LOW_CONFIDENCE_CODE,
             "message": f"OCR was unsure of {pages_said} (mean word confidence {scores} of 100, under "
                        f"ocr_min_confidence {min_confidence:.0f}): the text read there, and what the answer "
                        "draws from it, may be wrong"}]
