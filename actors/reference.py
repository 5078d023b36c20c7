"""Reference scorer: per-token log-probs of the frozen base model over the response
tokens of training rows, computed once (one Ray actor per reference stage) and stored,
so DPO and the f-divergence objectives never hold a second model while training."""
from __future__ import annotations

import torch

from actors.sequences import encode, micro_batches, pad_batch
from actors.token_logprobs import causal_lm_token_logprobs


class ReferenceScorer:
    """One model, loaded once, scoring any number of row sets (`score_rows`) or plain
    (prompt, completion) lists (`score`)."""

    def __init__(self, model_source, max_len: int, token_budget: int = 8192, chunk_tokens: int = 2048):
        from actors.gc_pause import gc_paused
        from actors.model_source import local_model_path

        with gc_paused():  # imports and model load: see actors/gc_pause.py
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model_path = local_model_path(model_source)
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.max_len, self.budget, self.chunk = max_len, token_budget, chunk_tokens
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], close_turn: bool = False) -> list[list[float] | None]:
        encoded = [encode(self.tokenizer, p, c, self.max_len, close_turn) for p, c in zip(prompts, completions)]
        out: list[list[float] | None] = [None] * len(encoded)
        valid = [i for i, e in enumerate(encoded) if e is not None]
        for mb in micro_batches([len(encoded[i]["ids"]) for i in valid], self.budget):
            idx = [valid[j] for j in mb]
            batch = pad_batch([encoded[i] for i in idx], self.pad)
            device = next(self.model.parameters()).device
            logp = causal_lm_token_logprobs(self.model, batch["input_ids"].to(device),
                                            batch["attention_mask"].to(device), chunk_tokens=self.chunk,
                                            score_mask=batch["mask"].to(device)).float().cpu()
            for row, i in enumerate(idx):
                m = batch["mask"][row].bool()
                out[i] = logp[row][m].tolist()
        return out

    def score_rows(self, rows: list[dict], targets: list[str], template: str | None = None) -> list[dict]:
        """For each row and each completion column c in `targets`, {"ref_<c>": log-probs,
        one per response token, aligned with actors.sequences.encode; [] for a row over
        max_len}. Rows carry `prompt`, or with a `template` a `problem` rendered here as
        the train loop renders it (a gold demonstration, so its turn is closed)."""
        if template:
            from actors.prompt_templates import render_prompt

            prompts = [render_prompt(self.tokenizer, template, r["problem"]) for r in rows]
        else:
            prompts = [r["prompt"] for r in rows]
        out: list[dict] = [{} for _ in rows]
        for col in targets:
            for o, s in zip(out, self.score(prompts, [r[col] for r in rows], close_turn=bool(template))):
                o[f"ref_{col}"] = s if s is not None else []
        return out
