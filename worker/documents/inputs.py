"""A job's input as parts (page texts and page images), their token counts, and the chunks of a
document too long for one request. Parts are what chunk jobs store: `{"text": ...}` or
`{"image": sha256, "width": w, "height": h}`, each with the page it came from."""
from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

from schemas.sql.store import StoredPage, Store
from worker.documents.chunking import plan_chunks, split_text
from worker.models.info import ModelInfo

Part = dict[str, Any]


def document_parts(pages: list[StoredPage], is_vision: bool, store: Store) -> list[Part]:
    """One part per page: its image for a vision model when the page is a scan, else its text."""
    parts: list[Part] = []
    for page_no, page in enumerate(pages, start=1):
        if page.image_sha256 and is_vision:
            with Image.open(io.BytesIO(store.read_document(page.image_sha256)[0])) as image:
                parts.append({"image": page.image_sha256, "width": image.width, "height": image.height,
                              "page": page_no})
        else:
            parts.append({"text": f"[page {page_no}]\n{page.text}", "page": page_no})
    return parts


def part_tokens(part: Part, info: ModelInfo) -> int:
    if "image" in part:
        return info.image_tokens(part["width"], part["height"])
    return info.count_tokens(part["text"])


def plan_job_chunks(parts: list[Part], info: ModelInfo, budget: int, overlap_tokens: int) -> list[list[Part]] | None:
    """None when the parts fit one request; else chunks of consecutive parts, each within `budget`,
    text cut on paragraph boundaries and overlapping by up to `overlap_tokens`."""
    counts = [part_tokens(part, info) for part in parts]
    if sum(counts) <= budget:
        return None
    pieces: list[Part] = []
    for part, count in zip(parts, counts):
        if "text" in part and count > budget:
            pieces.extend({**part, "text": piece} for piece in split_text(part["text"], info.count_tokens, budget))
        else:
            pieces.append(part)
    counts = [part_tokens(piece, info) for piece in pieces]
    groups = plan_chunks(counts, budget, overlap_tokens, can_overlap=["text" in piece for piece in pieces])
    return [[pieces[i] for i in group] for group in groups]


def reduce_parts(outputs: list[dict[str, Any]]) -> list[Part]:
    """The answers for consecutive parts (stored results: JSON or text), labelled, as a reduce step's input."""
    texts = [json.dumps(o["json"], ensure_ascii=False) if "json" in o else o["text"].strip() for o in outputs]
    return [{"text": f"[part {i}]\n{text}"} for i, text in enumerate(texts, start=1)]


def materialise(parts: list[Part], store: Store) -> list[str | Image.Image]:
    """Parts as a vision prompt takes them: strings and decoded images."""
    return [Image.open(io.BytesIO(store.read_document(p["image"])[0])).convert("RGB") if "image" in p else p["text"]
            for p in parts]
