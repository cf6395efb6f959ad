"""`/v1/batches`: create, retrieve, list (newest first), cancel, scoped to the caller's key.

Create answers at once with a `validating` batch and hands the intake to a thread of this process (the sweeper of
any API process takes over one whose process died). Retrieve moves the batch on when it is due (`outcome.advance`).
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.api.auth import caller
from producer.api.context import ApiContext, context
from producer.api.errors import ApiError, not_found
from producer.api.files import live_file
from producer.api.intake import take_in, task_name
from producer.api.objects import BATCH_PREFIX, batch_object, list_page
from producer.api.outcome import advance
from schemas.openai import CHAT_URL, TASK_URL_PREFIX
from schemas.settings import Settings
from schemas.sql.models import ApiBatch, utcnow

WINDOW = re.compile(r"^([1-9][0-9]*)([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TAKE_IN_GRACE_S = 30  # how long a new batch waits for its own process's intake before another process may take it in


class OutputExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 86400)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str = Field(description="24h as OpenAI; docbatch takes any <n>s, m, h or d")
    metadata: dict[str, str] | None = None
    output_expires_after: OutputExpiresAfter | None = None

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if not WINDOW.match(value):
            raise ValueError("must be a duration such as 24h (a number and s, m, h or d)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return value

    @property
    def window_s(self) -> int:
        number, unit = WINDOW.match(self.completion_window).groups()
        return int(number) * UNIT_S[unit]


def router(settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/v1/batches", dependencies=[Depends(caller)])

    def own_batch(ctx: ApiContext, key_id: str, batch_id: str) -> ApiBatch:
        row = ctx.store.get_api_batch(key_id, batch_id.removeprefix(BATCH_PREFIX)) \
            if batch_id.startswith(BATCH_PREFIX) else None
        if row is None:
            raise not_found("Batch", batch_id)
        return row

    @api.post("")
    def create(body: BatchCreate, key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        if body.endpoint != CHAT_URL and not (body.endpoint.startswith(TASK_URL_PREFIX)
                                              and task_name(body.endpoint) in ctx.tasks):
            offered = [f"{TASK_URL_PREFIX}{name}" for name in ctx.tasks if name != "chat"]
            raise ApiError(400, f"endpoint must be {CHAT_URL} or one of {', '.join(offered)}", param="endpoint")
        source = live_file(ctx, key_id, body.input_file_id)
        if source.purpose != "batch":
            raise ApiError(400, f"file {source.id} has purpose {source.purpose}; a batch's input needs purpose batch",
                           param="input_file_id")
        ctx.redis.ping()  # refuse (503) rather than record a batch that could not be sent now
        now = utcnow()
        expires_s = body.output_expires_after.seconds if body.output_expires_after else settings.api_output_expires_s
        # made with this process's intake lease, which its intake thread takes over at once: another API process's
        # sweeper takes the batch in only when this process did not (it died) within TAKE_IN_GRACE_S
        row = ctx.store.add_api_batch(key_id=key_id, endpoint=body.endpoint, input_file_id=source.id,
                                      completion_window=body.completion_window, metadata_=body.metadata,
                                      output_expires_s=expires_s, expires_at=now + dt.timedelta(seconds=body.window_s),
                                      lease_owner=ctx.owner, lease_until=now + dt.timedelta(seconds=TAKE_IN_GRACE_S))
        ctx.intake.submit(take_in, ctx, row.id)
        return batch_object(row, settings.model)

    @api.get("")
    def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                     key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        rows, has_more = ctx.store.api_batches(key_id, after=after.removeprefix(BATCH_PREFIX) if after else None,
                                               limit=limit)
        return list_page([batch_object(row, settings.model) for row in rows], has_more)

    @api.get("/{batch_id}")
    def retrieve(batch_id: str, key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        return batch_object(advance(ctx, own_batch(ctx, key_id, batch_id)), settings.model)

    @api.post("/{batch_id}/cancel")
    def cancel(batch_id: str, key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        row = own_batch(ctx, key_id, batch_id)
        if row.status in ("validating", "in_progress"):
            was = row.status
            if ctx.store.move_api_batch(row.id, [was], status="cancelling", cancelling_at=utcnow(),
                                        end_status="cancelled") and was == "in_progress":
                ctx.store.cancel_batch(row.id)
            row = own_batch(ctx, key_id, batch_id)
        elif row.status not in ("cancelling", "cancelled"):
            raise ApiError(409, f"batch {batch_id} is {row.status}: only a validating or in_progress batch can be "
                                "cancelled", code="batch_not_cancellable")
        return batch_object(advance(ctx, row), settings.model)

    return api
