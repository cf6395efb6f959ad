"""Prepare stage: text in any common encoding and PDFs with a text layer; broken input gets a reason code."""
from __future__ import annotations

import io

import pytest
from pypdf import PdfWriter
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from schemas.states import DocbatchError, ErrorCode
from worker.extract import extract_pages


def make_pdf(pages: list[str]) -> bytes:
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    for text in pages:
        pdf.drawString(72, 750, text)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def _code(data: bytes, media_type: str) -> ErrorCode:
    with pytest.raises(DocbatchError) as info:
        extract_pages(data, media_type)
    return info.value.code


def test_utf8_text_is_one_page():
    assert extract_pages("Vertrag über 5 000 €".encode(), "text/plain") == ["Vertrag über 5 000 €"]


def test_latin1_and_cp1252_text_are_decoded_not_mangled():
    text = ("Contrat de bail commercial entre la Société Générale Immobilière et Clément Müller. "
            "Le loyer annuel est payé à l'échéance; la durée est de neuf années.")
    assert extract_pages(text.encode("latin-1"), "text/plain") == [text]
    euro = "Le dépôt de garantie s'élève à 18 600 € — payable à la signature du bail commercial."
    assert extract_pages(euro.encode("cp1252"), "text/plain") == [euro]


def test_nul_bytes_are_stripped():
    assert extract_pages(b"Total\x00 assets", "text/plain") == ["Total assets"]


def test_pdf_text_layer_is_read_per_page():
    pages = extract_pages(make_pdf(["Page one: the parties.", "Page two: the term."]), "application/pdf")
    assert [p.strip() for p in pages] == ["Page one: the parties.", "Page two: the term."]


def test_empty_file_fails_with_empty_file():
    assert _code(b"", "text/plain") == ErrorCode.EMPTY_FILE


def test_whitespace_only_text_fails_with_no_text():
    assert _code(b"  \n\t ", "text/plain") == ErrorCode.NO_TEXT


def test_truncated_or_garbage_pdf_fails_with_pdf_corrupt():
    whole = make_pdf(["All of it."])
    assert _code(whole[: len(whole) // 3], "application/pdf") == ErrorCode.PDF_CORRUPT
    assert _code(b"this is not a pdf at all", "application/pdf") == ErrorCode.PDF_CORRUPT


def test_encrypted_pdf_fails_with_pdf_encrypted_but_an_empty_password_is_tried():
    def encrypted(user_password: str) -> bytes:
        writer = PdfWriter(clone_from=io.BytesIO(make_pdf(["Confidential terms."])))
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
        out = io.BytesIO()
        writer.write(out)
        return out.getvalue()

    assert _code(encrypted("s3cret"), "application/pdf") == ErrorCode.PDF_ENCRYPTED
    assert extract_pages(encrypted(""), "application/pdf")[0].strip() == "Confidential terms."


def test_pdf_without_text_layer_fails_with_pdf_no_text():
    assert _code(make_pdf([""]), "application/pdf") == ErrorCode.PDF_NO_TEXT
