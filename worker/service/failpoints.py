"""Fault injection for the fault suite (`tests/faults/`, `benchmarks/fault_suite.py`).

A failpoint is a named place in the worker where a process dies the way a real crash kills it (SIGKILL
of itself, no clean-up) when the job's document contains a marker. `settings.failpoints` lists
`point=marker` items, e.g. `DOCBATCH_FAILPOINTS='["infer_claimed=POISON"]'`: the infer process dies
whenever it claims a job whose document holds `POISON`, so that document kills every worker that takes
it, as a hostile file does. Empty by default; never set it in production.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from schemas.settings import Settings

log = logging.getLogger(__name__)
POINTS = ("prepare_claimed", "infer_claimed")


def hit(point: str, settings: Settings, document: Callable[[], bytes]) -> None:
    """Die here if `point` is armed and the job's `document` (read only then) contains its marker."""
    if point not in POINTS:
        raise ValueError(f"unknown failpoint {point!r}")
    markers = [item.split("=", 1)[1] for item in settings.failpoints if item.split("=", 1)[0] == point]
    if any(marker.encode() in document() for marker in markers if marker):
        log.error("failpoint %s: this document kills its worker", point)
        os.kill(os.getpid(), signal.SIGKILL)
