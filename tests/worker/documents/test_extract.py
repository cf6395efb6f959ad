"""Prepare stage on generated fixtures: each kind of document, good or hostile, and its outcome."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from documents import (encrypted_pdf, multipage_tiff, pdf, pixel_bomb_png, rotated_jpeg, stream_bomb_pdf,
                       text_image)
from schemas.states import DocbatchError, ErrorCode
from worker.documents.extract import ExtractLimits, extract_pages, normalise_image, sniff


def _code(data: bytes, limits: ExtractLimits = ExtractLimits()) -> ErrorCode:
    with pytest.raises(DocbatchError) as info:
        extract_pages(data, limits)
    return info.value.code


def test_utf8_text_is_one_page():
    (page,) = extract_pages("Vertrag über 5 000 €".encode())
    assert (page.text, page.source) == ("Vertrag über 5 000 €", "text")


def test_latin1_and_cp1252_text_are_decoded_not_mangled():
    text = ("Contrat de bail commercial entre la Société Générale Immobilière et Clément Müller. "
            "Le loyer annuel est payé à l'échéance; la durée est de neuf années.")
    assert extract_pages(text.encode("latin-1"))[0].text == text
    euro = "Le dépôt de garantie s'élève à 18 600 € — payable à la signature du bail commercial."
    assert extract_pages(euro.encode("cp1252"))[0].text == euro


def test_nul_bytes_are_stripped():
    assert extract_pages(b"Total\x00 assets")[0].text == "Total assets"


def test_text_pdf_is_read_per_page_with_page_order_kept():
    pages = extract_pages(pdf(["Page one: the parties are Acme and Globex.", "Page two: the term is two years."]))
    assert [p.source for p in pages] == ["text", "text"]
    assert [p.text.strip() for p in pages] == ["Page one: the parties are Acme and Globex.",
                                                "Page two: the term is two years."]


def test_image_only_pdf_pages_are_rendered_as_upright_page_images():
    scan = text_image(["SCANNED INVOICE", "Total due: 1,250 EUR"])
    (page,) = extract_pages(pdf([scan]), ExtractLimits(max_image_side=1024))
    assert page.source == "image" and page.text == ""
    assert page.image.mode == "RGB" and max(page.image.size) == 1024
    assert page.image.height > page.image.width  # portrait A4 stays portrait


def test_mixed_pdf_is_handled_page_by_page():
    pages = extract_pages(pdf(["A text page with a real text layer on it.", text_image(["A scanned page"]),
                               "Another text page with a text layer."]))
    assert [p.source for p in pages] == ["text", "image", "text"]


def test_multipage_tiff_gives_one_page_per_frame():
    frames = [text_image([f"Frame {i}"], size=(600, 800)) for i in range(3)]
    pages = extract_pages(multipage_tiff(frames))
    assert [p.source for p in pages] == ["image"] * 3
    assert all(p.image.size == (600, 800) for p in pages)


def test_rotated_jpeg_is_turned_upright_from_its_exif_orientation():
    upright = text_image(["Upright"], size=(600, 900))
    (page,) = extract_pages(rotated_jpeg(upright))
    assert page.image.size == (600, 900)  # stored 900 x 600, shown (and now read) as 600 x 900


def test_images_are_normalised_to_rgb_and_a_maximum_side():
    image = normalise_image(Image.new("L", (4000, 1000), 200), max_side=2000)
    assert (image.mode, image.size) == ("RGB", (2000, 500))


@pytest.mark.parametrize("mode, file_format", [("L", "PNG"), ("RGB", "PNG"), ("RGB", "JPEG")])
def test_an_image_that_normalising_leaves_as_it_is_keeps_its_bytes(mode, file_format):
    # Given a scan saved as a grey or RGB PNG or JPEG, upright, within the side limit
    out = io.BytesIO()
    text_image(["Invoice 42"], size=(600, 800)).convert(mode).save(out, format=file_format)
    # When it is extracted
    (page,) = extract_pages(out.getvalue())
    # Then the page is the file itself (stored as it came), whose pixels are the page's
    assert page.is_file
    assert Image.open(io.BytesIO(out.getvalue())).convert("RGB").tobytes() == page.image.tobytes()


def test_an_image_that_normalising_changes_keeps_no_bytes():
    upright = text_image(["Invoice 42"], size=(600, 800))
    changed = {"exif turn": rotated_jpeg(upright), "frames": multipage_tiff([upright, upright]),
               "alpha": _saved(upright.convert("RGBA"), "PNG"), "palette": _saved(upright.convert("P"), "PNG"),
               "over the side limit": _saved(text_image(["Big"], size=(600, 3000)), "PNG")}
    for what, data in changed.items():
        assert not any(page.is_file for page in extract_pages(data)), what


def _saved(image: Image.Image, file_format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=file_format)
    return out.getvalue()


def test_empty_file_fails_with_empty_file():
    assert _code(b"") == ErrorCode.EMPTY_FILE


def test_whitespace_only_text_fails_with_no_text():
    assert _code(b"  \n\t ") == ErrorCode.NO_TEXT


def test_truncated_or_garbage_pdf_fails_with_pdf_corrupt():
    whole = pdf(["All of it."])
    assert _code(whole[: len(whole) // 3]) == ErrorCode.PDF_CORRUPT
    assert _code(b"%PDF-1.7\n this is not a pdf at all") == ErrorCode.PDF_CORRUPT


def test_encrypted_pdf_fails_with_pdf_encrypted_but_an_empty_password_is_tried():
    assert _code(encrypted_pdf("Confidential terms.", "s3cret")) == ErrorCode.PDF_ENCRYPTED
    assert extract_pages(encrypted_pdf("Confidential terms.", ""))[0].text.strip() == "Confidential terms."


def test_pdf_stream_that_decompresses_past_the_limit_is_a_decompression_bomb():
    bomb = stream_bomb_pdf(decompressed_bytes=40_000_000)
    assert len(bomb) < 100_000
    assert _code(bomb, ExtractLimits(max_stream_bytes=10_000_000)) == ErrorCode.DECOMPRESSION_BOMB


def test_pixel_bomb_fails_before_it_is_decoded_and_the_message_quotes_docbatchs_limit():
    # Given a PNG of 400 million pixels, small on disk, and a limit of 50 million
    bomb = pixel_bomb_png(20_000)
    assert len(bomb) < 100_000
    # When it is extracted
    with pytest.raises(DocbatchError) as raised:
        extract_pages(bomb, ExtractLimits(max_image_pixels=50_000_000))
    # Then it is a decompression bomb, in docbatch's own terms (Pillow's limit is twice its setting)
    assert raised.value.code == ErrorCode.DECOMPRESSION_BOMB
    assert raised.value.message == ("the image would be 20,000 x 20,000 = 400,000,000 pixels, over max_image_pixels "
                                    "(50,000,000)")
    # ... and so is an image just over the limit, where Pillow would only have warned
    assert _code(pixel_bomb_png(110), ExtractLimits(max_image_pixels=10_000)) == ErrorCode.DECOMPRESSION_BOMB


def test_corrupt_image_and_unknown_binary_content():
    png = pixel_bomb_png(100)
    assert _code(png[:40]) == ErrorCode.IMAGE_CORRUPT
    assert _code(b"PK\x03\x04" + bytes(range(256)) * 8) == ErrorCode.UNSUPPORTED_TYPE


def test_type_comes_from_content_not_name():
    assert sniff(pdf(["x"])) == "application/pdf"
    assert sniff(pixel_bomb_png(10)) == "image/png"
    assert sniff(rotated_jpeg(Image.new("RGB", (10, 10)))) == "image/jpeg"
    assert sniff("plain words".encode("utf-16")) == "text/plain"
    assert sniff(b"\x7fELF\x02\x01\x01" + bytes(200)) == "application/octet-stream"


