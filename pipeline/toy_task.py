"""The toy task: integer addition, small enough that a model trained on CPU in minutes
is partially competent, so sampling yields both right and wrong answers.

Three splits, disjoint by construction (different seeds and a held-out filter):
  train   — 2-digit + 2-digit prompts for sampling / training
  id      — the same distribution, held out: in-distribution evaluation
  harder  — 3-digit + 2-digit: measures generalisation beyond the training range
"""
from __future__ import annotations

import random

SPLITS = ("train", "id", "harder")
SOURCE = "toy-addition"


def problem_text(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def solution_text(a: int, b: int) -> str:
    """Column addition from the last digit, then the boxed answer: each step is a
    one-digit fact a small model can learn, so errors come from sampling, not luck."""
    steps, carry = [], 0
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xs), len(ys))):
        terms = [int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0] + ([carry] if carry else [])
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total}")
        carry = total // 10
    return f"{', '.join(steps)}, so {a}+{b}={a + b}. \\boxed{{{a + b}}}"


def _pair(rng: random.Random, split: str) -> tuple[int, int]:
    if split == "harder":
        return rng.randint(100, 999), rng.randint(10, 99)
    return rng.randint(10, 99), rng.randint(10, 99)


def _is_held_out(a: int, b: int) -> bool:
    # A fixed ~20% of 2-digit pairs never appear in "train", so "id" is truly held out.
    return (a * 7 + b * 13) % 5 == 0


def make_problems(split: str, count: int, seed: int) -> list[dict]:
    """Deterministic, duplicate-free problems of one split: rows {problem, gold}."""
    if split not in SPLITS:
        raise ValueError(f"toy split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    seen: set[tuple[int, int]] = set()
    rows = []
    capacity = 90 * 90 if split != "harder" else 900 * 90
    if count > capacity // 6:
        raise ValueError(f"toy split {split!r} has room for about {capacity // 6} problems, asked for {count}")
    while len(rows) < count:
        a, b = _pair(rng, split)
        if (a, b) in seen:
            continue
        if split != "harder" and _is_held_out(a, b) != (split == "id"):
            continue
        seen.add((a, b))
        rows.append({"problem": problem_text(a, b), "gold": str(a + b)})
    return rows


def pretraining_pairs(rng: random.Random) -> tuple[int, int]:
    """What the toy base model learns from: mostly 2-digit sums, some 1- and 3-digit,
    never a held-out ("id") 2-digit pair."""
    while True:
        r = rng.random()
        if r < 0.75:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if _is_held_out(a, b):
                continue
        elif r < 0.9:
            a, b = rng.randint(0, 9), rng.randint(0, 99)
        else:
            a, b = rng.randint(100, 999), rng.randint(10, 99)
        return a, b


def prompt_row(problem: dict, source: str = SOURCE) -> dict:
    """A toy problem as a `prompts` row (gold and the column-addition solution for SFT)."""
    from pipeline.sources import prompt_id_for

    a, b = (int(x) for x in problem["problem"].removeprefix("What is ").rstrip("?").split(" + "))
    return {"prompt_id": prompt_id_for(source, problem["problem"]), "problem": problem["problem"],
            "gold": problem["gold"], "source": source, "solution": solution_text(a, b)}
