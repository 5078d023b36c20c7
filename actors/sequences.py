"""Training sequences: tokenisation shared by the reference scorer and the train loop
(so reference log-probs line up token for token), the step schedule, and micro-batches
by token budget with length grouping (padding stays small)."""
from __future__ import annotations

import math
import random

import torch


def encode(tokenizer, prompt: str, completion: str, max_len: int) -> dict | None:
    """ids = prompt + completion + eos, cut to max_len; None if no response token fits."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)[:max_len]
    if len(ids) <= len(p):
        return None
    return {"ids": ids, "n_prompt": len(p)}


def response_len(ex: dict) -> int:
    return len(ex["ids"]) - ex["n_prompt"]


def step_schedule(num_units: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Unit indices of every optimizer step: a fresh permutation per epoch, cut into
    steps of batch_size (the last one may be smaller)."""
    total = max(1, math.ceil(num_units * epochs))
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        perm = list(range(num_units))
        random.Random(seed * 1000 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    order = order[:total]
    return [order[i:i + batch_size] for i in range(0, total, batch_size)]


def micro_batches(lengths: list[int], token_budget: int, width: int = 1) -> list[list[int]]:
    """Group unit indices so that (#units * width) * longest <= token_budget; sorting by
    length first keeps padding small. A unit longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) + 1) * width * longest > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(examples: list[dict], pad_id: int, refs: list[list[float]] | None = None) -> dict:
    """Right-padded tensors. mask[t] marks response tokens in the *shifted* (next-token)
    space, i.e. whether input_ids[t+1] is a response token; ref_logp aligned the same way."""
    T = max(len(e["ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T - 1), dtype=torch.float32)
    ref = torch.zeros((B, T - 1), dtype=torch.float32) if refs is not None else None
    for b, e in enumerate(examples):
        n, p = len(e["ids"]), e["n_prompt"]
        ids[b, :n] = torch.tensor(e["ids"])
        attn[b, :n] = 1
        mask[b, p - 1:n - 1] = 1
        if ref is not None:
            r = refs[b]
            if len(r) != n - p:
                raise ValueError(f"reference log-probs have {len(r)} tokens for a response of {n - p}")
            ref[b, p - 1:n - 1] = torch.tensor(r, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "mask": mask, "ref_logp": ref}
