"""The module-level Celery app for Celery's own command line: `celery -A worker.celery_app
worker|flower|inspect|events ...` finds `app`, built from the settings when first asked for, so every
Celery tool speaks to Redis exactly as docbatch does (`schemas.messages` says why that matters).
"""
from __future__ import annotations

import functools

from celery import Celery

from schemas.messages import make_celery
from schemas.settings import Settings


@functools.cache
def _module_app() -> Celery:
    import worker.telemetry.exporter  # noqa: F401 - registers `celery inspect docbatch_telemetry` with Celery's command line

    app = make_celery(Settings.load())
    app.conf.include = ["worker.service.tasks", "worker.service.standalone"]  # what a `celery -A worker.celery_app worker` runs
    return app


def __getattr__(name: str) -> Celery:
    """`app` (and `celery`): the module-level app Celery's `-A worker.celery_app` looks for, made on first use so
    that importing this module reads no settings."""
    if name in ("app", "celery"):
        return _module_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
