"""Lifecycle states and failure reason codes, one `str` Enum each, shared by the database, JSON and the CLI.

The transition table beside `JobState` lists every legal move; `Store.transition` is the only code that
writes a job's state, and it refuses a move the table does not list.
"""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"  # its document is waiting for extraction
    PREPARING = "preparing"  # a prepare process holds it (under a lease)
    READY = "ready"  # its prompt's inputs are stored; waiting for a GPU worker
    RUNNING = "running"  # a GPU worker holds it (under a lease)
    WAITING = "waiting"  # a long document whose chunk jobs run; it holds no lease
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    @property
    def is_held(self) -> bool:
        """A worker holds the job under a lease it keeps renewing."""
        return self in (JobState.PREPARING, JobState.RUNNING)


_S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # claimed by a prepare process; cancelled before it starts
    _S.QUEUED: frozenset({_S.PREPARING, _S.CANCELLED}),
    # extracted (ready, or waiting on its chunks); failed on its own input; back to queued when its lease
    # expired (the process died); cancelled (the extraction's outcome is then dropped)
    _S.PREPARING: frozenset({_S.READY, _S.WAITING, _S.FAILED, _S.QUEUED, _S.CANCELLED}),
    # claimed by a GPU worker; failed without running (too many crashes); cancelled before it starts
    _S.READY: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
    # answered; failed; back to ready when its lease expired; cancelled by its worker, told to stop (`cancel`)
    # before its engine started it (or at once, `cancel --now`), or by the sweep when that worker died
    _S.RUNNING: frozenset({_S.DONE, _S.FAILED, _S.READY, _S.CANCELLED}),
    # its chunks' answers merged (done) or handed to the model (ready); a chunk failed; another level of
    # chunks (waiting again); cancelled with its chunks
    _S.WAITING: frozenset({_S.DONE, _S.READY, _S.WAITING, _S.FAILED, _S.CANCELLED}),
    _S.DONE: frozenset(),
    # retried (`docbatch retry`, a resubmit), or a failed chunk made again by its document's next try
    _S.FAILED: frozenset({_S.QUEUED, _S.READY}),
    _S.CANCELLED: frozenset({_S.QUEUED, _S.READY}),
}


class StopRequest(str, enum.Enum):
    """What `docbatch cancel` asks of a running job, kept in its `error_code` until the job ends (the table has
    no column of its own for it): its worker reads it at its next lease renewal, or at once when told by
    broadcast. A job that ends done or failed overwrites it."""

    CANCEL = "cancel_requested"  # cancelled unless its answer is being generated, which finishes
    CANCEL_NOW = "cancel_now_requested"  # cancelled even then (`cancel --now`)
    EXPIRE = "expire_requested"  # as CANCEL, with the reason code `expired` (an API batch's window ended)

    @property
    def is_now(self) -> bool:
        return self is StopRequest.CANCEL_NOW

    @property
    def reason(self) -> "ErrorCode | None":
        """The reason code the job is cancelled with (its `error_message` then says why), or None."""
        return ErrorCode.EXPIRED if self is StopRequest.EXPIRE else None

    @classmethod
    def asked(cls, now: bool, code: "ErrorCode | None") -> "StopRequest":
        """The stop a cancel asks for: `now`, or for a reason (only `expired` has one), or plain."""
        if now:
            return cls.CANCEL_NOW
        if code is None:
            return cls.CANCEL
        if code is ErrorCode.EXPIRED:
            return cls.EXPIRE
        raise ValueError(f"a cancel has no reason code {code.value!r}")

    @classmethod
    def of(cls, error_code: str | None) -> "StopRequest | None":
        """The stop a running job's `error_code` asks for, or None."""
        return next((stop for stop in cls if stop.value == error_code), None)


class IllegalTransition(ValueError):
    """A state change the transition table does not list: a bug in the caller, never a job's fault."""


def check_transition(from_states: frozenset[JobState] | set[JobState], to_state: JobState) -> None:
    """Raise `IllegalTransition` unless every state in `from_states` may move to `to_state`."""
    illegal = sorted(s.value for s in from_states if to_state not in TRANSITIONS[s])
    if illegal:
        raise IllegalTransition(f"a job may not move from {', '.join(illegal)} to {to_state.value}")


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
    # the HTTP API: a request not finished when its batch's completion window ended (it was cancelled then)
    EXPIRED = "expired"


class DocbatchError(Exception):
    """An expected failure of one job, with its reason code. Anything else is a bug (`internal_error`)."""

    def __init__(self, code: ErrorCode, message: str, raw_text: str | None = None, *,
                 tokens_in: int | None = None, tokens_out: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.raw_text = raw_text  # what the model answered, kept when the answer itself was the problem
        self.tokens_in, self.tokens_out = tokens_in, tokens_out  # what the job spent before it failed

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class JobCancelled(Exception):
    """A held job stopped because `docbatch cancel` asked it to: it ends `cancelled`, neither failed nor retried.
    The message says when it stopped."""
