"""`docbatch flower`: Flower on docbatch's own Celery app (`celery -A worker.celery_app flower`), behind basic
auth from the settings.

Flower can revoke tasks and shut workers down, so it never listens unauthenticated on an interface others
can reach: without `flower_user` and `flower_password` it refuses to start, unless told `--insecure-local`
and bound to loopback. The credentials reach Flower through its environment (`FLOWER_BASIC_AUTH`), not its
command line, which any user of the host can read.
"""
from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass

from schemas.settings import Settings


class FlowerRefused(ValueError):
    """Flower would be open to others, or its options cannot work; the message says what to set."""


@dataclass(frozen=True)
class FlowerLaunch:
    argv: list[str]
    env: dict[str, str]
    url: str


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_launch(settings: Settings, *, address: str, port: int, read_only: bool,
                  insecure_local: bool) -> FlowerLaunch:
    """The command and environment that run Flower as asked, or FlowerRefused."""
    user, password = settings.flower_user, settings.flower_password.get_secret_value()
    env = {**os.environ, **settings.to_env()}
    env.pop("FLOWER_BASIC_AUTH", None)
    if insecure_local:
        if not is_loopback(address):
            raise FlowerRefused(f"--insecure-local serves Flower without a password, so only on loopback "
                                f"(127.0.0.1), not on {address}")
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # its HTTP API answers without credentials too
    elif not (user and password):
        raise FlowerRefused("Flower needs credentials: set DOCBATCH_FLOWER_USER and DOCBATCH_FLOWER_PASSWORD (or "
                            "flower_user and flower_password in the settings file), or run it on this machine only "
                            "with --insecure-local")
    elif ":" in user or "," in user or "," in password:
        raise FlowerRefused("Flower's user may not contain ':' or ',', nor its password ','")
    else:
        env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", f"--address={address}",
            f"--port={port}"]
    if read_only:
        argv.append("--read_only=true")
    return FlowerLaunch(argv, env, f"http://{address}:{port}/")
