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

    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    UNSUPPORTED_TYPE = "unsupported_type"
    PDF_CORRUPT = "pdf_corrupt"
    PDF_ENCRYPTED = "pdf_encrypted"
    PDF_NO_TEXT = "pdf_no_text"
    NO_TEXT = "no_text"
    OUT_OF_MEMORY = "out_of_memory"
    GENERATION_ERROR = "generation_error"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    INTERNAL_ERROR = "internal_error"


class DocbatchError(Exception):
    """An expected failure of one job, with its reason code. Anything else is a bug (`internal_error`)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
