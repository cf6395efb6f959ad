"""The API when Redis or the database is away: 503 with Retry-After in OpenAI's error shape, never a traceback, and
nothing half-made. A `docbatch api` process over a fresh PostgreSQL database, its broker a port nobody listens on;
no worker (nothing is meant to run)."""
from __future__ import annotations

import openai
import psycopg
import pytest
from click.testing import CliRunner
from conftest import POSTGRES_URL, postgres_database
from services import api_process

from producer.cli import main as cli
from producer.service.embedded import free_port
from schemas.settings import Settings

pytestmark = pytest.mark.slow


def test_redis_and_database_outages_answer_503_with_retry_after_and_make_nothing(tmp_path):
    with postgres_database() as url:
        # Given an API over PostgreSQL whose Redis is away, and a key
        settings = Settings(home=tmp_path / "home", database_url=url, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                            api_port=free_port())
        key = CliRunner().invoke(cli, ["api-key", "create", "ops"], env=settings.to_env()).stdout.strip()
        with api_process(settings, tmp_path / "api.log"):
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.api_port}/v1", api_key=key, max_retries=0)
            source = api.files.create(file=("r.jsonl", b'{"custom_id": "a", "url": "/v1/chat/completions"}'),
                                      purpose="batch")

            # When a batch is asked for while Redis cannot be reached
            with pytest.raises(openai.InternalServerError) as info:
                api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")

            # Then the answer is 503 with Retry-After, and no batch was recorded
            assert info.value.status_code == 503 and int(info.value.response.headers["retry-after"]) > 0
            assert info.value.body["type"] == "server_error"
            assert api.batches.list().data == []

            # When the database goes away too
            name = url.rsplit("/", 1)[1]
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            with pytest.raises(openai.InternalServerError) as info:
                api.files.list()

            # Then that is a 503 with Retry-After as well
            assert info.value.status_code == 503 and "retry-after" in info.value.response.headers
        log = (tmp_path / "api.log").read_text()
        assert "Traceback" not in log
