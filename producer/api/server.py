"""`docbatch api`: the checks before the server listens, then uvicorn.

Beyond a loopback address the server refuses to start unless at least one live key exists (every request needs
one anyway, but an open port with no key at all is a deployment mistake worth stopping at).
"""
from __future__ import annotations

import ipaddress
import logging

import uvicorn

from producer.api.app import create_app
from producer.api.context import offered_tasks
from schemas.settings import Settings
from schemas.sql.store import Store


class ApiRefused(ValueError):
    """The server will not start as configured; the message says what to change."""


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        return False


def check(settings: Settings, address: str, store: Store) -> None:
    """Raise `ApiRefused` when a task file in `api_tasks` is wrong, or `address` reaches beyond this machine and no
    live key exists."""
    try:
        offered_tasks(settings)
    except ValueError as e:
        raise ApiRefused(f"api_tasks: {e}") from e
    if not is_loopback(address) and store.num_live_api_keys() == 0:
        raise ApiRefused(f"refusing to listen on {address} without an API key: create one with "
                         "`docbatch api-key create NAME` (or listen on 127.0.0.1)")


def serve(settings: Settings, address: str, port: int) -> None:
    """Run the API until SIGINT or SIGTERM (uvicorn's graceful shutdown)."""
    store = Store(settings.effective_database_url, settings.blob_dir)
    store.migrate()
    try:
        check(settings, address, store)
    finally:
        store.close()
    logging.getLogger("producer.api").setLevel(logging.INFO)
    uvicorn.run(create_app(settings), host=address, port=port, log_level="info", access_log=True,
                server_header=False, timeout_graceful_shutdown=30)
