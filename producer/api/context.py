"""What every request handler and the sweeper share in one API process: settings, store, broker, the tasks offered.

Nothing in it is state of a batch or a file: those live in the store, so any number of API processes serve one
store and one Redis.
"""
from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
from celery import Celery
from fastapi import Request

from schemas.messages import make_celery
from schemas.settings import Settings
from schemas.sql.store import Store
from schemas.tasks import BUILTIN_TASKS, CHAT_TASK, TaskDefinition, builtin_task, load_task_file

INTAKE_THREADS = 2


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    celery: Celery
    redis: redis.Redis
    tasks: dict[str, TaskDefinition]  # what a batch's endpoint may name: chat, summarize, extract, api_tasks
    owner: str  # this process, as the holder of batch leases
    intake: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(INTAKE_THREADS, "intake"))

    @classmethod
    def open(cls, settings: Settings) -> "ApiContext":
        """Connect to the store (migrated) and the broker, and load the offered tasks (ValueError if a task file
        is wrong, or names a built-in task)."""
        store = Store(settings.effective_database_url, settings.blob_dir)
        store.migrate()
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=5)
        return cls(settings, store, make_celery(settings), client, offered_tasks(settings),
                   f"api@{socket.gethostname()}/{os.getpid()}")

    def close(self) -> None:
        self.intake.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def offered_tasks(settings: Settings) -> dict[str, TaskDefinition]:
    tasks = {name: builtin_task(name, settings) for name in (CHAT_TASK, *BUILTIN_TASKS)}
    for path in settings.api_tasks:
        task = load_task_file(path, settings)
        if task.name in tasks:
            raise ValueError(f"{path}: api_tasks may not redefine the task {task.name!r}")
        tasks[task.name] = task
    return tasks


def context(request: Request) -> ApiContext:
    """FastAPI dependency: this process's context."""
    return request.app.state.context
