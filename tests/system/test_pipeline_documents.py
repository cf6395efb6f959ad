"""Documents as they really arrive, through a real worker: scans, images, long contracts, hostile files."""
from __future__ import annotations

import io
import os

import pytest
from PIL import Image, ImageFilter
from conftest import BRIEF_TASK, PARTIES_TASK, shared_worker_settings, worker_process
from documents import (
    encrypted_pdf,
    multipage_tiff,
    pdf,
    pixel_bomb_png,
    rotated_jpeg,
    stream_bomb_pdf,
    text_image,
)
from rich.console import Console

from producer.results.progress import wait_for_batch
from producer.intake.submit import Source, submit
from schemas.messages import make_celery
from schemas.sql.store import Store
from schemas.tasks import builtin_task

pytestmark = pytest.mark.slow
QUIET = Console(file=io.StringIO())
CLAUSE = ("{n}. The Supplier shall maintain the Services described in Schedule {n} and report on them to the "
          "Customer each month; the Customer shall pay the fees for Schedule {n} within thirty days.")


MODULE_REDIS_DB = 10


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory, small_model_dir):
    """One worker for the text tests: SQLite (test_pipeline.py runs the worker on PostgreSQL too), and an
    input budget of 2,048 tokens, this CPU suite's stand-in for the small model's 8K context."""
    return shared_worker_settings(tmp_path_factory.mktemp("documents"), small_model_dir, MODULE_REDIS_DB,
                                  max_input_tokens=2048)


def _fixtures(folder, outside):
    """Every kind of input the prepare stage must take, each with its expected (state, error code)."""
    folder.mkdir()
    files = {
        "text.pdf": (pdf(["Services agreement between Acme Corp and Globex Ltd for two years."]), ("done", None)),
        "scan.pdf": (pdf([text_image(["LEASE AGREEMENT", "Rent: 2,000 EUR per month"])]), ("done", None)),
        "mixed.pdf": (pdf(["Page one has a text layer and names the parties.",
                           text_image(["Page two is a scan"])]), ("done", None)),
        "pages.tiff": (multipage_tiff([text_image([f"Scanned page {i}"], (600, 800)) for i in range(2)]),
                       ("done", None)),
        "photo.jpg": (rotated_jpeg(text_image(["Invoice 42"], (600, 800))), ("done", None)),
        "sideways.png": (_png(text_image(SIDEWAYS).rotate(90, expand=True)), ("done", None)),
        "smudged.png": (_png(_smudged(text_image(SIDEWAYS))), ("done", None)),
        "lease-cp1252.txt": ("Loyer annuel: 74 400 € payé à Société Générale.".encode("cp1252"), ("done", None)),
        "locked.pdf": (encrypted_pdf("Secret terms.", "s3cret"), ("failed", "pdf_encrypted")),
        "truncated.pdf": (pdf(["Cut short."])[:200], ("failed", "pdf_corrupt")),
        "bomb.png": (pixel_bomb_png(20_000), ("failed", "decompression_bomb")),
        "stream-bomb.pdf": (stream_bomb_pdf(100_000_000), ("failed", "decompression_bomb")),
        "empty.txt": (b"", ("failed", "empty_file")),
        "archive.docx": (b"PK\x03\x04" + bytes(range(256)) * 16, ("failed", "unsupported_type")),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    outside.write_text("a file outside the submitted folder")
    (folder / "escape.txt").symlink_to(outside)
    os.mkfifo(folder / "pipe.txt")
    expected = {f"{folder.name}/{name}": outcome for name, (_, outcome) in files.items()}
    expected[f"{folder.name}/escape.txt"] = ("failed", "symlink_escape")
    expected[f"{folder.name}/pipe.txt"] = ("failed", "not_regular_file")
    return expected


SIDEWAYS = ["SUPPLY AGREEMENT", "between Initech LLC (supplier)", "and Umbrella plc (customer)"]


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _smudged(image):
    """Scanned at a quarter of the resolution and blurred: Tesseract reads it, unsure of its words."""
    return image.resize((image.width // 4, image.height // 4)).filter(ImageFilter.GaussianBlur(1.2)).resize(image.size)


def _run(store: Store, settings, folder, worker, timeout_s: int, task=None):
    """Submit `folder` for `task` (summaries by default) and wait while `worker` runs them: (the new batch, its
    final status)."""
    batch = submit(settings, store, make_celery(settings), Source(paths=(folder,)),
                   task or builtin_task("summarize", settings), console=QUIET).batch
    status = wait_for_batch(store, batch.batch_id, console=QUIET, timeout_s=timeout_s,
                            check_alive=lambda: worker.poll() is None or pytest.fail("worker died"))
    return batch, status


def test_every_kind_of_input_ends_as_expected_and_the_worker_survives(module_settings, module_worker, tmp_path):
    # Given a folder with good, scanned and hostile files, a symlink out of it and a FIFO
    expected = _fixtures(tmp_path / "inbox", tmp_path / "outside.txt")
    store = Store(module_settings.effective_database_url)
    store.migrate()
    # When it is submitted and run by a real worker (text-only model: scans go through Tesseract), for a task
    # of short answers (what is tested here is all before and around the model)
    batch, status = _run(store, module_settings, tmp_path / "inbox", module_worker, timeout_s=600, task=PARTIES_TASK)
    # Then each file ends as expected, with its reason code, and nothing is left running
    from producer.results.export import batch_records

    outcomes = {r.name: (r.state.value, r.error_code) for r in batch_records(store, batch.batch_id)}
    assert outcomes == expected
    assert status.is_finished and module_worker.poll() is None
    # ... the scans were read by OCR, and the pages are stored for a retry
    rows = {item.name: (job, result) for item, job, result in store.batch_rows(batch.batch_id)}
    (page,) = store.load_pages(rows["inbox/scan.pdf"][0].document_sha256)
    assert page.source == "ocr" and "LEASE" in page.text.upper() and page.image_sha256
    # ... a scan lying sideways (no EXIF orientation) was turned upright and read cleanly
    (page,) = store.load_pages(rows["inbox/sideways.png"][0].document_sha256)
    assert "SUPPLY AGREEMENT" in page.text and page.ocr_confidence > 80
    stored = Image.open(io.BytesIO(store.read_document(page.image_sha256)[0]))  # the page as read: turned
    assert (stored.format, stored.size) == ("PNG", text_image(SIDEWAYS).size)
    assert "warnings" not in rows["inbox/sideways.png"][1].data
    # ... and a smudged one, read with little confidence, warns on its answer rather than passing as clean
    (warning,) = rows["inbox/smudged.png"][1].data["warnings"]
    assert warning["code"] == "ocr_low_confidence" and "page 1 " in warning["message"]
    store.close()


def test_a_long_contract_is_chunked_mapped_and_reduced(module_settings, module_worker, tmp_path):
    # Given a 64-page contract, an input budget of 2,048 tokens, and a task of a bounded summary and the parties
    settings = module_settings
    pages = ["\n\n".join(CLAUSE.format(n=p * 10 + k) for k in range(2)) for p in range(64)]
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "master_agreement.pdf").write_bytes(pdf(pages))
    store = Store(settings.effective_database_url)
    store.migrate()
    # When it runs
    batch, status = _run(store, settings, folder, module_worker, timeout_s=900, task=BRIEF_TASK)
    # Then the document job is done after a map over several chunks and a reduce over their answers:
    # merged by the schema's rules, the model asked only about what the chunks disagree on (their summaries)
    assert (status.done, status.failed) == (1, 0)
    ((_, parent, result),) = store.batch_rows(batch.batch_id)
    assert parent.num_chunks >= 3 and parent.chunk_level == 1
    assert len(store.chunk_outputs(parent.id, 1)) == parent.num_chunks
    (reduce_input,) = parent.input_parts
    assert reduce_input["text"].startswith("Merged answer:\n{") and "\n- summary: [" in reduce_input["text"]
    assert result.data["json"]["summary"] is not None and parent.tokens_in < 2048
    # ... and progress counted the chunks as units of work
    assert store.unit_counts(batch.batch_id) == (1 + parent.num_chunks, 1 + parent.num_chunks)
    store.close()


def test_a_vision_model_worker_reads_scans_as_images_not_ocr(settings, vl_model_dir, tmp_path):
    # Given a worker whose model is a (tiny, random) Qwen2.5-VL, and a scan next to a text file
    # (a random model's answers are noise: free text of 4 tokens, not the schema, is asked of it)
    vl_settings = settings.model_copy(update={"model": str(vl_model_dir), "max_new_tokens": 4, "ignore_eos": True,
                                              "database_url": f"sqlite:///{tmp_path / 'vl.sqlite3'}"})
    folder = tmp_path / "vl"
    folder.mkdir()
    (folder / "scan.png").write_bytes(pdf_page_png())
    (folder / "note.txt").write_text("Short note: rent is due on the first day of each month.")
    with worker_process(vl_settings, tmp_path / "vl-worker.log") as worker:
        store = Store(vl_settings.effective_database_url)
        store.migrate()
        # When both are submitted and run
        batch, status = _run(store, vl_settings, folder, worker, timeout_s=600)
    # Then both are done, and the scan reached the model as an image (stored, never OCR'd)
    assert (status.done, status.failed) == (2, 0)
    rows = {item.name: job for item, job, _ in store.batch_rows(batch.batch_id)}
    (page,) = store.load_pages(rows["vl/scan.png"].document_sha256)
    assert (page.source, page.text) == ("image", "") and page.image_sha256
    assert page.image_sha256 == rows["vl/scan.png"].document_sha256  # an upright PNG: the file itself, stored once
    store.close()


def pdf_page_png() -> bytes:
    out = io.BytesIO()
    text_image(["RENT INVOICE", "Amount: 2,000 EUR"], size=(560, 400)).save(out, format="PNG")
    return out.getvalue()
