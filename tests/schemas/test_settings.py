"""Settings come from DOCBATCH_* variables and a TOML file, in that order of precedence."""
import pytest
from pydantic import ValidationError

from schemas.settings import PACKAGED_MODEL, Settings


def test_defaults_are_the_embedded_ones(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DOCBATCH_HOME", str(tmp_path))
    settings = Settings.load()
    assert settings.model == PACKAGED_MODEL and settings.device == "auto"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'docbatch.sqlite3'}"
    assert settings.visibility_timeout_s > settings.lease_s


def test_toml_file_then_environment(monkeypatch, tmp_path):
    config = tmp_path / "docbatch.toml"
    config.write_text('max_batch_size = 7\nmodel = "Qwen/Qwen2.5-7B-Instruct"\n')
    monkeypatch.setenv("DOCBATCH_CONFIG", str(config))
    monkeypatch.setenv("DOCBATCH_MAX_BATCH_SIZE", "9")
    settings = Settings.load()
    assert settings.max_batch_size == 9 and settings.model == "Qwen/Qwen2.5-7B-Instruct"


def test_a_child_process_rebuilds_the_same_settings(monkeypatch, tmp_path):
    original = Settings(home=tmp_path, max_wait_ms=7, blob_dir=tmp_path / "b", ignore_eos=True)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings.load() == original


def test_bad_values_are_refused_with_the_field_named(monkeypatch):
    monkeypatch.setenv("DOCBATCH_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings.load()
    monkeypatch.delenv("DOCBATCH_MAX_BATCH_SIZE")
    with pytest.raises(ValidationError, match="not a URL"):
        Settings.load(database_url="docbatch.db")


def test_weight_formats_and_offload_are_checked_when_settings_are_built():
    assert Settings(weight_format="nf4", kv_cache_dtype="fp8").weight_format == "nf4"
    with pytest.raises(ValidationError, match="weight_format"):
        Settings(weight_format="int8")  # vLLM quantises online to fp8 or nf4 only
    with pytest.raises(ValidationError, match="CPU offload"):
        Settings(gpu_weights_gb=20, weight_format="fp8")
    with pytest.raises(ValidationError, match="CPU offload"):
        Settings(gpu_weights_gb=20, engine="vllm")
    assert Settings(gpu_weights_gb=20, engine="hf").gpu_weights_gb == 20
