"""The prepare stage: a document's pages extracted once and stored (scans turned upright, then OCR'd when the
model reads no images, kept as images when it does); a document too long for one request becomes chunk jobs."""
from __future__ import annotations

import hashlib
import io
import logging

from schemas.sql.models import Job
from schemas.states import DocbatchError, ErrorCode
from schemas.sql.store import StoredPage
from worker.documents.extract import ExtractedPage, extract_pages
from worker.documents.inputs import document_parts, plan_job_chunks
from worker.documents.ocr import read_upright, upright
from worker.service.runtime import Runtime
from worker.stages.reducing import chunk_budget, send_infer, start_chunks

log = logging.getLogger(__name__)


def prepare_job(rt: Runtime, job: Job, name: str | None) -> None:
    """Extract a held job's document; make the job ready (and send it on), or split it into chunk jobs."""
    task = rt.task(job.params.get("task"))
    if task.kind == "chat":  # an OpenAI request: nothing to extract
        chunks = None
    else:
        pages = ensure_pages(rt, job)
        parts = document_parts(pages, rt.info.is_vision, rt.store)
        chunks = plan_job_chunks(parts, rt.info, chunk_budget(rt, task), rt.settings.chunk_overlap_tokens)
    if chunks is None:
        if rt.store.mark_ready(job.id, rt.holder):
            send_infer(rt, job.id, job.priority, name)
    else:
        log.info("%s: %d parts in %d chunks", rt.store.describe_job(job.id), len(parts), len(chunks))
        start_chunks(rt, job, 1, chunks, from_held=True)


def ensure_pages(rt: Runtime, job: Job) -> list[StoredPage]:
    """The job's document's pages, extracted once and stored; scans OCR'd when the model reads no images."""
    sha256 = job.document_sha256
    pages = rt.store.load_pages(sha256)
    if pages is None:
        data, _ = rt.store.read_document(sha256)
        pages = [_stored(rt, job, page_no, page)
                 for page_no, page in enumerate(extract_pages(data, rt.limits), start=1)]
    elif not rt.info.is_vision and any(p.source == "image" for p in pages):
        # Extracted earlier for a vision model: the text-only model needs the scans' text now.
        pages = [_ocr(rt, _load_image(rt, p.image_sha256), p.image_sha256) if p.source == "image" else p
                 for p in pages]
    else:
        return pages
    if not any(p.text.strip() or p.source == "image" for p in pages):
        raise DocbatchError(ErrorCode.NO_TEXT, "no text on any page (OCR found none either)")
    rt.store.save_pages(sha256, pages)
    return pages


def _stored(rt: Runtime, job: Job, page_no: int, page: ExtractedPage) -> StoredPage:
    """A freshly extracted page as stored: its image turned upright and kept by reference, read by OCR while
    still in memory when the model reads no images."""
    if page.image is None:
        return StoredPage(page.text, page.source)
    timeout_s = rt.settings.prepare_timeout_s
    if rt.info.is_vision:
        image, turned_deg = upright(page.image, timeout_s=timeout_s)
        read = None
    else:
        image, read, turned_deg = read_upright(page.image, lang=rt.settings.ocr_lang, timeout_s=timeout_s)
    if turned_deg:
        log.info("%s: scanned page %d turned %d degrees clockwise to read it upright", rt.store.describe_job(job.id),
                 page_no, turned_deg)
    image_sha256 = job.document_sha256 if page.is_file and not turned_deg else _store_image(rt, image)
    if read is None:
        return StoredPage("", "image", image_sha256)
    return StoredPage(read.text, "ocr", image_sha256, read.confidence)


def _store_image(rt: Runtime, image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    rt.store.put_document(sha, data, "image/png")
    return sha


def _load_image(rt: Runtime, image_sha256: str):
    from PIL import Image

    return Image.open(io.BytesIO(rt.store.read_document(image_sha256)[0]))


def _ocr(rt: Runtime, image, image_sha256: str) -> StoredPage:
    """A page stored as an image for a vision model (turned upright then), read for a text-only one now."""
    _, read, _ = read_upright(image, lang=rt.settings.ocr_lang, timeout_s=rt.settings.prepare_timeout_s)
    return StoredPage(read.text, "ocr", image_sha256, read.confidence)
