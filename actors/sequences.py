"""Training sequences: tokenisation shared by the sampler (stop tokens), the reference
scorer and the train loop (so reference log-probs line up token for token), the step
schedule, and micro-batches by token budget with length grouping (padding stays small).

A sequence is exactly what the model saw and produced: prompt tokens, then the
completion's tokens. A sampled completion is stored as generated: it ends with the text
of the token the sampler stopped on (the tokenizer's EOS or the chat template's
end-of-turn token, e.g. `<|im_end|>`; see `stop_token_ids`) and with nothing after a
`length` finish, so `encode` appends nothing to it. A demonstration (a gold solution,
never sampled) gets the end-of-turn token appended (`close_turn=True`), as the chat
template closes an assistant turn. A sequence longer than `max_len` (prompt + response
tokens) is dropped, never cut: cutting would lose the answer and the stop token.
"""
from __future__ import annotations

import math
import random
import weakref

import torch

# Per-tokenizer cache of the end-of-turn token id (rendering a template per row is slow).
_END_OF_TURN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MARK = "VERIFINE_END_OF_TURN_PROBE"


def special_token_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with: the first special token
    the template writes after the assistant's content (`<|im_end|>` for ChatML / Qwen,
    `<|eot_id|>` for Llama 3, ...). The tokenizer's EOS when the template writes none
    (or there is no template); None when there is neither."""
    try:
        return _END_OF_TURN[tokenizer]
    except (KeyError, TypeError):
        pass
    found = None
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"},
                                                  {"role": "assistant", "content": _MARK}], tokenize=False)
        except Exception:  # a template that refuses this conversation: fall back to EOS
            text = ""
        if isinstance(text, str) and _MARK in text:
            after = text[text.index(_MARK) + len(_MARK):]
            special = special_token_ids(tokenizer)
            ids = tokenizer(after, add_special_tokens=False)["input_ids"]
            found = next((i for i in ids if i in special), None)
    if found is None:
        found = tokenizer.eos_token_id
    try:
        _END_OF_TURN[tokenizer] = found
    except TypeError:
        pass
    return found


def stop_token_ids(tokenizer) -> list[int]:
    """What sampling stops on: the tokenizer's EOS and the chat template's end-of-turn
    token (for Qwen's template both `<|endoftext|>` and `<|im_end|>`)."""
    out = []
    for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if i is not None and i not in out:
            out.append(int(i))
    return out


def token_ids(tokenizer, text: str) -> list[int]:
    """Tokens of `text` as the sampler and the train loop see it (no BOS/EOS added: the
    chat template writes its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_row(tokenizer, prompt: str, completion: str, max_len: int,
               close_turn: bool = False) -> tuple[dict | None, str | None]:
    """(sequence, None), or (None, why) with why "too_long" (prompt + response tokens >
    max_len: dropped, not cut) or "empty" (no response token).

    ids = prompt + completion tokens (+ the end-of-turn token when `close_turn` and the
    completion does not already end with a stop token)."""
    p = token_ids(tokenizer, prompt)
    c = token_ids(tokenizer, completion)
    if close_turn:
        end = end_of_turn_id(tokenizer)
        if end is not None and not (c and c[-1] in stop_token_ids(tokenizer)):
            c = c + [end]
    if not c:
        return None, "empty"
    if len(p) + len(c) > max_len:
        return None, "too_long"
    return {"ids": p + c, "n_prompt": len(p)}, None


def encode(tokenizer, prompt: str, completion: str, max_len: int, close_turn: bool = False) -> dict | None:
    """ids = prompt + completion tokens (see `encode_row`); None if the row is dropped."""
    return encode_row(tokenizer, prompt, completion, max_len, close_turn)[0]


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
