"""The API's FastAPI application: the Files and Batches routers behind Bearer keys, errors in OpenAI's shape,
and the sweeper thread for the life of the process."""
from __future__ import annotations

import contextlib

from fastapi import FastAPI

from producer.api import batches, errors, files
from producer.api.context import ApiContext
from producer.api.limits import BodyLimit
from producer.api.sweeper import Sweeper
from schemas.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    """The application for `settings`; it opens the store and Redis (and loads `api_tasks`) when it starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx = ApiContext.open(settings)
        sweeper = Sweeper(ctx)
        app.state.context = ctx
        sweeper.start()
        try:
            yield
        finally:
            sweeper.stop()
            ctx.close()

    app = FastAPI(title="docbatch", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.include_router(files.router(settings))
    app.include_router(batches.router(settings))
    app.add_middleware(BodyLimit, settings=settings)
    return app
