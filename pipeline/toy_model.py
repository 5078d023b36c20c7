"""The toy base model: a tiny Qwen2-architecture causal LM with its own byte-level
tokenizer and chat template, trained here on CPU until it is *partially* competent at
the toy task, and saved as a normal HF model directory that transformers and vLLM load.

Built once per (recipe, seed) and cached; the build is deterministic given the seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from pipeline import toy_task

# Bump when the recipe changes: it is part of the cache key.
RECIPE_VERSION = 3
TOY_MODEL_NAME = "toy"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Stop training once sampled accuracy (temperature 1) on held-out prompts reaches this:
# the middle of the 20-70% band the pipeline needs (some right, some wrong answers).
TARGET_ACCURACY = 0.40
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)


def cache_root() -> Path:
    """Where models built here live: $VERIFINE_CACHE, default ~/.cache/verifine."""
    return Path(os.environ.get("VERIFINE_CACHE", Path.home() / ".cache" / "verifine"))


def toy_model_dir(seed: int = 0) -> Path:
    key = hashlib.sha1(json.dumps([RECIPE_VERSION, seed, MODEL_SHAPE, TARGET_ACCURACY]).encode()).hexdigest()[:12]
    return cache_root() / f"toy-model-{key}"


def ensure_toy_model(seed: int = 0, log=print) -> Path:
    """Return the cached toy model directory, building it first if needed."""
    return build_once(toy_model_dir(seed), lambda tmp: build_toy_model(tmp, seed=seed, log=log))


def build_once(target: Path, build) -> Path:
    """`target`, after `build(tmp)` filled a temporary directory beside it (ending with
    build.json) unless a complete build is there already."""
    if (target / "build.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic: a half-built model never looks complete
        except OSError:
            if not (target / "build.json").exists():  # lost a race to a parallel build?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: one token per byte, any text encodes.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_prompt(tokenizer, problem: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": problem}],
                                         tokenize=False, add_generation_prompt=True)


def _training_batch(tokenizer, rng: random.Random, size: int):
    import torch

    texts, prompt_lens = [], []
    for _ in range(size):
        a, b = toy_task.pretraining_pairs(rng)
        prompt = chat_prompt(tokenizer, toy_task.problem_text(a, b))
        texts.append(prompt + toy_task.solution_text(a, b) + tokenizer.eos_token)
        prompt_lens.append(len(tokenizer(prompt)["input_ids"]))
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = -100  # learn the answers, not the prompt
    return enc["input_ids"], enc["attention_mask"], labels


def sampled_accuracy(model, tokenizer, problems: list[dict], samples: int = 2, seed: int = 0) -> float:
    """Share of correct answers sampled at temperature 1 with plain transformers generate."""
    import torch

    from actors.verifier import judge

    tokenizer.padding_side = "left"
    prompts = [chat_prompt(tokenizer, p["problem"]) for p in problems]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=48, num_return_sequences=samples,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    golds = [p["gold"] for p in problems for _ in range(samples)]
    return sum(judge(t, g)[0] == "correct" for t, g in zip(texts, golds)) / len(texts)


def build_toy_model(out_dir: Path, seed: int = 0, log=print, max_steps: int = 2000) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **MODEL_SHAPE)
    model = Qwen2ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    probe = toy_task.make_problems("id", 48, seed=seed + 1000)  # disjoint from the pipeline's sets
    start, accuracy, step = time.time(), 0.0, 0
    while step < max_steps:
        model.train()
        ids, mask, labels = _training_batch(tokenizer, rng, 64)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0 or (step >= 300 and step % 25 == 0):
            model.eval()
            accuracy = sampled_accuracy(model, tokenizer, probe, seed=seed + step)
            log(f"[toy model] step {step} loss {loss.item():.3f} sampled accuracy {accuracy:.2f} "
                f"({time.time() - start:.0f}s)")
            if accuracy >= TARGET_ACCURACY:
                break
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"recipe": RECIPE_VERSION, "seed": seed, "steps": step, "probe_accuracy": accuracy,
            "seconds": round(time.time() - start, 1), "params": sum(p.numel() for p in model.parameters())}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2))
    return info
