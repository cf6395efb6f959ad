"""Lifecycle states and failure reason codes, one `str` Enum each, shared by the database, JSON and the CLI."""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    READY = "ready"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class ErrorCode(str, enum.Enum):
    """Stable reason codes for failed jobs; `docbatch results` prints them, scripts may match on them."""

    # rejected at submit: never opened, or too large to take in
    NOT_REGULAR_FILE = "not_regular_file"
    SYMLINK_ESCAPE = "symlink_escape"
    FILE_TOO_LARGE = "file_too_large"
    UNREADABLE = "unreadable"
    INVALID_REQUEST = "invalid_request"  # an OpenAI Batch line docbatch cannot run (the message says why)
    # prepare stage
    EMPTY_FILE = "empty_file"
    UNSUPPORTED_TYPE = "unsupported_type"
    NO_TEXT = "no_text"
    PDF_CORRUPT = "pdf_corrupt"
    PDF_ENCRYPTED = "pdf_encrypted"
    IMAGE_CORRUPT = "image_corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_MANY_PAGES = "too_many_pages"
    OCR_FAILED = "ocr_failed"
    EXTRACT_TIMEOUT = "extract_timeout"
    EXTRACT_MEMORY = "extract_memory"
    INPUT_TOO_LONG = "input_too_long"
    # infer stage
    SCHEMA_INVALID = "schema_invalid"
    CHUNK_FAILED = "chunk_failed"
    OUT_OF_MEMORY = "out_of_memory"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    INTERNAL_ERROR = "internal_error"


class DocbatchError(Exception):
    """An expected failure of one job, with its reason code. Anything else is a bug (`internal_error`)."""

    def __init__(self, code: ErrorCode, message: str, raw_text: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.raw_text = raw_text  # what the model answered, kept when the answer itself was the problem

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
