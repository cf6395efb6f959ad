"""Tesseract on scans made in the test: pages turned upright before they are read, and the words' confidence
kept, so that a page Tesseract was unsure of warns instead of passing as clean."""
from __future__ import annotations

import pytest
from PIL import ImageFilter

from documents import pdf, text_image
from schemas.sql.store import StoredPage
from schemas.states import DocbatchError, ErrorCode
from worker.documents.extract import extract_pages
from worker.documents.ocr import LOW_CONFIDENCE_CODE, NOT_INSTALLED, ocr_image, ocr_warnings, read_upright, upright

LINES = ["SERVICES AGREEMENT", "between Acme Corporation (supplier)", "and Globex Limited (customer),",
         "dated 1 March 2024. The supplier", "shall deliver the goods within", "thirty days of each order."]


def test_tesseract_reads_the_words_of_a_rendered_page():
    (page,) = extract_pages(pdf([text_image(["MASTER SERVICES AGREEMENT", "Governing law: Delaware",
                                              "Payment due within 30 days"])]))
    read = ocr_image(page.image)
    for word in ("MASTER", "SERVICES", "AGREEMENT", "DELAWARE", "PAYMENT", "30"):
        assert word in read.text.upper()
    assert read.confidence > 80


@pytest.mark.parametrize("turned_deg, garbled_as_it_lies", [(90, True), (180, True), (270, False)])
def test_a_scan_turned_sideways_or_upside_down_is_read_upright(turned_deg, garbled_as_it_lies):
    # Given a scanned page lying turned (PIL turns counter-clockwise), with no EXIF orientation to say so;
    # read as it lies, Tesseract garbles it ('SAEAL JO ...'), except, here, when turned by three quarters
    scan = text_image(LINES).rotate(turned_deg, expand=True)
    assert ("SERVICES AGREEMENT" not in ocr_image(scan).text) == garbled_as_it_lies
    # When it is turned upright by orientation detection, then read
    image, turned_by = upright(scan)
    read = ocr_image(image)
    # Then it was turned back and its words are read, with confidence
    assert turned_by == turned_deg
    assert "SERVICES AGREEMENT" in read.text and "Globex Limited" in read.text
    assert read.confidence > 80


def test_a_sideways_page_of_a_few_lines_is_read_upright_though_orientation_detection_is_unsure():
    # Given a page of three lines lying on its side: too little text for OSD to be sure of its turn
    scan = text_image(["SUPPLY AGREEMENT", "between Initech LLC (supplier)", "and Umbrella plc (customer)"])
    sideways = scan.rotate(90, expand=True)
    assert upright(sideways)[1] == 0  # what a vision model gets: turned only when OSD is sure
    # When a text-only model's worker reads it, then it reads both ways and keeps the surer reading
    image, read, turned_by = read_upright(sideways)
    assert turned_by == 90 and image.size == scan.size
    assert "SUPPLY AGREEMENT" in read.text and read.confidence > 80
    # ... and an upright page of a few lines stays as it is
    assert read_upright(scan)[2] == 0


def test_an_upright_page_is_left_as_it_is():
    scan = text_image(LINES)
    image, turned_by = upright(scan)
    assert (turned_by, image.size) == (0, scan.size)


def test_a_page_tesseract_is_unsure_of_warns_and_a_clean_one_does_not():
    # Given a clean scan and a smudged one (scanned at a quarter of the resolution, blurred)
    clean = text_image(LINES)
    smudged = clean.resize((clean.width // 4, clean.height // 4)).filter(ImageFilter.GaussianBlur(1.2)).resize(clean.size)
    # When both are read
    pages = [StoredPage(read.text, "ocr", "sha", read.confidence) for read in map(ocr_image, (clean, smudged))]
    # Then the smudged page's words come with a low confidence, and only it is named in the warning
    assert pages[0].ocr_confidence > 80 > 60 > pages[1].ocr_confidence
    (warning,) = ocr_warnings([StoredPage("typed", "text"), *pages], min_confidence=60)
    assert warning["code"] == LOW_CONFIDENCE_CODE
    assert warning["message"].startswith(f"OCR was unsure of page 3 (mean word confidence "
                                         f"{pages[1].ocr_confidence:.0f} of 100, under ocr_min_confidence 60)")
    assert ocr_warnings(pages[:1], min_confidence=60) == []


def test_without_tesseract_a_page_goes_as_it_lies_and_ocr_fails_with_its_reason(monkeypatch, tmp_path, caplog):
    # Given a host without Tesseract (the GPU machines of BENCHMARKS.md have none)
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-tesseract"))
    written = []
    monkeypatch.setattr(pytesseract.pytesseract, "save", lambda image: written.append(image))  # the page to a file
    sideways = text_image(LINES).rotate(90, expand=True)
    # When a vision model's page is turned upright, twice
    with caplog.at_level("WARNING", logger="worker.documents.ocr"):
        first, second = upright(sideways), upright(sideways)
    # Then it goes as it lies, without pytesseract writing the page to a file first, and the host is told once
    assert first == second == (sideways, 0)
    assert written == []
    assert [r.getMessage() for r in caplog.records] == [
        "tesseract is not installed (apt-get install tesseract-ocr): page images are not turned upright, and scans "
        "cannot be read for a text-only model"]
    # ... and reading it for a text-only model fails with the reason
    with pytest.raises(DocbatchError) as failed:
        read_upright(sideways)
    assert (failed.value.code, failed.value.message) == (ErrorCode.OCR_FAILED, NOT_INSTALLED)
    assert written == []
