"""`docbatch demo` as a user runs it: the bundled samples through an embedded Redis, SQLite and the packaged model.
Its first lines, its last line and its Markdown reports say which model answered and, for the packaged one, that
its answers prove the pipeline, not answer quality."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from producer.cli import demo_banner
from producer.service.embedded import free_port
from schemas.settings import PACKAGED_MODEL, Settings, model_caveat
from schemas.sql.store import Store

pytestmark = pytest.mark.slow


def test_the_demo_answers_every_sample_and_says_what_the_packaged_models_answers_prove(small_model_dir, tmp_path):
    # Given a fresh home whose model cache holds the converted packaged model, and no Redis at the configured URL
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(small_model_dir.parent)
    settings = Settings(home=home, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    # only these two: every other setting as a user's shell leaves it (the demo's own answer length among them)
    env = {**os.environ, "DOCBATCH_HOME": str(home), "DOCBATCH_BROKER_URL": settings.broker_url}

    # When the demo runs
    demo = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--gpus", "cpu", "--out-dir",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=900)

    # Then its first lines name the packaged model and what its answers prove, and its last line says it again
    assert demo.returncode == 0, demo.stderr[-3000:]
    lines = demo.stderr.splitlines()
    caveat = model_caveat(PACKAGED_MODEL)
    assert lines[:2] == demo_banner(PACKAGED_MODEL) == [
        "docbatch demo: the model smollm2-135m answers", caveat]
    assert lines[-1] == caveat
    # ... every sample is answered: four contracts summarized, three financial reports extracted
    exports = list((tmp_path / "out").glob("*.jsonl"))
    records = [json.loads(line) for path in exports for line in path.read_text().splitlines()]
    assert sorted((r["task"], r["state"]) for r in records) == [("extract", "done")] * 3 + [("summarize", "done")] * 4
    # ... and each batch's Markdown report names the model and the task definition, with the same note
    store = Store(settings.effective_database_url)
    for batch_id in (path.stem for path in exports):
        batch = store.get_batch(batch_id)
        report = subprocess.run([sys.executable, "-m", "producer.cli", "results", batch_id, "--format", "md"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert report.stdout.splitlines()[2:5] == [
            f"Model `{PACKAGED_MODEL}`; task `{batch.task}`, definition `{batch.task_hash}`.", "", f"> {caveat}"]
    store.close()
