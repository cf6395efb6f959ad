"""What a worker process builds once at start and hands to every task it runs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from schemas.settings import Settings
from schemas.store import Store


@dataclass
class Runtime:
    settings: Settings
    worker_name: str
    engine: Any = None  # worker.engine.Engine on infer workers
    tokenizer: Any = None
    max_input_tokens: int = 0
    _stores: dict[int, Store] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        """One store per process: prefork children must not share the parent's database connections."""
        pid = os.getpid()
        if pid not in self._stores:
            self._stores[pid] = Store(self.settings.effective_database_url, self.settings.blob_dir)
        return self._stores[pid]


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("no worker runtime installed: tasks run only inside `docbatch worker`")
    return _current
