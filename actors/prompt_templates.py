"""Prompt templates: `chat` puts the problem as the user turn of the model's own chat
template; `qwen-boxed` is the Qwen2.5-Math evaluation prompt used by the DFT paper."""
from __future__ import annotations

QWEN_BOXED_SYSTEM = "You are a helpful assistant."
QWEN_BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("chat", "qwen-boxed")


def render_prompt(tokenizer, template: str, problem: str) -> str:
    if template == "chat":
        messages = [{"role": "user", "content": problem}]
    elif template == "qwen-boxed":
        messages = [{"role": "system", "content": QWEN_BOXED_SYSTEM},
                    {"role": "user", "content": problem + QWEN_BOXED_SUFFIX}]
    else:
        raise ValueError(f"unknown prompt template {template!r} (known: {', '.join(TEMPLATES)})")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"model tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template; "
                         f"use a chat/instruct model or add one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
