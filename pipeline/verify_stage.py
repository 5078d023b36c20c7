"""Verify stage: math-verify judges every sample against its prompt's gold answer (Ray
tasks on CPU, hard per-item deadline), then the samples are split into training sets:

  positives — correct, finished (truncated dropped), deduplicated, capped per prompt
  pairs     — chosen correct / rejected incorrect, same prompt, capped per prompt
"""
from __future__ import annotations

import time
from collections import defaultdict

from actors.verifier import VERDICTS, verify_with_ray

VERSION = 1
# Counts of the data files plus the judging time: not hashed by the trainings (runner.Stage.logs).
LOGS = ("stats.json",)

# Only a confident "wrong" is a rejected answer; timeouts/errors say nothing about quality.
REJECTABLE = ("incorrect", "no_answer")


def judge_samples(samples: list[dict], golds: dict[str, str], num_tasks: int, deadline_s: float) -> list[dict]:
    """samples + gold, verdict, pred."""
    missing = sorted({s["prompt_id"] for s in samples} - set(golds))
    if missing:
        raise ValueError(f"{len(missing)} sampled prompt ids have no gold answer in the prompts stage "
                         f"(e.g. {missing[0]}): sample and prompts stages disagree; re-run with --force sample")
    results = verify_with_ray([s["completion"] for s in samples], [golds[s["prompt_id"]] for s in samples],
                              num_tasks=num_tasks, deadline_s=deadline_s)
    return [{**s, "gold": golds[s["prompt_id"]], "verdict": v, "pred": p} for s, (v, p) in zip(samples, results)]


def split_training_sets(judged: list[dict], max_positives: int, max_pairs: int) -> tuple[list[dict], list[dict]]:
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in judged:
        by_prompt[row["prompt_id"]].append(row)
    positives, pairs = [], []
    for pid in sorted(by_prompt):
        rows = sorted(by_prompt[pid], key=lambda r: r["sample_idx"])
        good = _unique([r for r in rows if r["verdict"] == "correct" and r["finish_reason"] == "stop"])
        bad = _unique([r for r in rows if r["verdict"] in REJECTABLE])
        for r in good[:max_positives]:
            positives.append({"prompt_id": pid, "sample_idx": r["sample_idx"], "prompt": r["prompt"],
                              "completion": r["completion"]})
        # Cycle both lists together: distinct pairs that reuse each answer as little as possible.
        for i in range(min(max_pairs, max(len(good), len(bad))) if good and bad else 0):
            chosen, rejected = good[i % len(good)], bad[i % len(bad)]
            pairs.append({"prompt_id": pid, "pair_idx": i, "prompt": chosen["prompt"],
                          "chosen": chosen["completion"], "rejected": rejected["completion"],
                          "chosen_idx": chosen["sample_idx"], "rejected_idx": rejected["sample_idx"]})
    return positives, pairs


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r["completion"] not in seen:
            seen.add(r["completion"])
            out.append(r)
    return out


def verify_stats(judged: list[dict], positives: list[dict], pairs: list[dict], n: int, seconds: float) -> dict:
    counts = {v: 0 for v in VERDICTS}
    per_prompt: dict[str, list[bool]] = defaultdict(list)
    for r in judged:
        counts[r["verdict"]] += 1
        per_prompt[r["prompt_id"]].append(r["verdict"] == "correct")
    prompts = len(per_prompt) or 1
    return {
        "samples": len(judged), "prompts": len(per_prompt), "verdicts": counts,
        "pass_at_1": sum(sum(c) / len(c) for c in per_prompt.values()) / prompts,
        f"pass_at_{n}": sum(any(c) for c in per_prompt.values()) / prompts,
        "prompts_all_correct": sum(all(c) for c in per_prompt.values()) / prompts,
        "prompts_mixed": sum(any(c) and not all(c) for c in per_prompt.values()) / prompts,
        "prompts_all_wrong": sum(not any(c) for c in per_prompt.values()) / prompts,
        "truncated": sum(r["finish_reason"] == "length" for r in judged),
        "positives": len(positives), "pairs": len(pairs),
        "seconds": round(seconds, 2), "verifications_per_s": round(len(judged) / max(seconds, 1e-9), 1),
    }


def run_verify_stage(ctx):
    prompts = ctx.store.read_rows(ctx.input_file("prompts", "prompts.parquet"))
    samples = ctx.store.read_rows(*ctx.input_files("sample"))
    golds = {p["prompt_id"]: p["gold"] for p in prompts}
    return run_verify(ctx.store, ctx.work_dir, samples, golds, ctx.cfg.sample.n, ctx.cfg.verify, ctx.log)


def run_verify(store, work_dir: str, samples: list[dict], golds: dict[str, str], n: int, cfg, log=print):
    start = time.time()
    judged = judge_samples(samples, golds, cfg.num_tasks, cfg.deadline_s)
    positives, pairs = split_training_sets(judged, cfg.max_positives_per_prompt, cfg.max_pairs_per_prompt)
    stats = verify_stats(judged, positives, pairs, n, time.time() - start)
    files = {"judged": f"{work_dir}/judged.parquet", "positives": f"{work_dir}/positives.parquet",
             "pairs": f"{work_dir}/pairs.parquet", "stats": f"{work_dir}/stats.json"}
    store.write_rows(files["judged"], judged)
    store.write_rows(files["positives"], positives)
    store.write_rows(files["pairs"], pairs)
    store.write_json(files["stats"], stats)
    log(f"  verdicts {stats['verdicts']}; pass@1 {stats['pass_at_1']:.3f}; "
        f"{len(positives)} positives, {len(pairs)} pairs")
    return list(files.values()), stats
