"""Sample stage: prompts -> `n` completions each, from a pool of vLLM engine actors
(pipeline/engine_pool.py) fed block by block. Output is written in blocks of prompts; a
rerun after a crash samples only the blocks that are missing, so every (prompt, sample)
ends up exactly once."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow as pa

from actors.sampler import PROMPT_TOO_LONG, EngineSpec
from pipeline import engine_pool
from pipeline.external import base_model_source
from pipeline.runner import kill_point

VERSION = 3  # 3: stop tokens from the tokenizer, completions keep their stop token, over-long prompts skipped

SAMPLE_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("prompt", pa.string()),
                           ("completion", pa.string()), ("finish_reason", pa.string()), ("num_tokens", pa.int32())])


# Test hook: a pause after each written block, so a test can stop a job mid-stage.
TEST_BLOCK_DELAY_S = float(os.environ.get("VERIFINE_TEST_BLOCK_DELAY_S", "0"))


MAX_NAMED = 100  # skipped prompt ids named in stats (all are counted)


def _skipped_prompt_ids(rows: list[dict]) -> list[str]:
    return sorted({r["prompt_id"] for r in rows if r["finish_reason"] == PROMPT_TOO_LONG})


def block_path(work_dir: str, block_id: int) -> str:
    return f"{work_dir}/block-{block_id:05d}.parquet"


def run_sample(ctx):
    """Sample every prompt into block files under the work dir; blocks already present
    (a killed run) are kept."""
    c = ctx.cfg
    problems = ctx.store.read_rows(ctx.input_file("prompts", "prompts.parquet"))
    model = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    spec = engine_spec(model, c.sample, c.model.dtype, c.run.seed, n=c.sample.n,
                       temperature=c.sample.temperature, top_p=c.sample.top_p, max_tokens=c.sample.max_tokens)
    files, stats = sample_jobs(ctx.store, [SampleJob(ctx.work_dir, problems, c.sample.template)], spec,
                               c.sample.num_engines, c.sample.gpus_per_engine, c.sample.block_size, ctx.log,
                               after_block=lambda: kill_point(f"{ctx.stage.name}:block"))
    return files[0], stats


def engine_spec(model_source, sample, dtype: str, seed: int, **sampling) -> EngineSpec:
    """An engine for `model_source` with the sample section's engine settings."""
    return EngineSpec(model=model_source, seed=seed, tensor_parallel=max(1, sample.gpus_per_engine),
                      gpu_memory_utilization=sample.gpu_memory_utilization, kv_cache_gib=sample.kv_cache_gib,
                      max_model_len=sample.max_model_len,
                      dtype=dtype, stop=tuple(sample.stop), **sampling)


@dataclass
class SampleJob:
    work_dir: str          # block files go here
    problems: list[dict]   # rows with prompt_id, problem
    template: str          # prompt template name


def sample_jobs(store, jobs: list[SampleJob], spec: EngineSpec, num_engines: int, gpus_per_engine: int,
                block_size: int, log=print, after_block=lambda: None) -> tuple[list[list[str]], dict]:
    """Sample several prompt sets with the same model through one pool of engines (so
    e.g. all benchmarks of a model pay for one engine start-up). Returns each job's
    block files and the stats of this call."""
    blocks = {(j, b): job.problems[i:i + block_size]
              for j, job in enumerate(jobs) for b, i in enumerate(range(0, len(job.problems), block_size))}
    todo = [key for key in blocks if not store.exists(block_path(jobs[key[0]].work_dir, key[1]))]
    stats = {"prompts": sum(len(j.problems) for j in jobs), "blocks": len(blocks),
             "blocks_resumed": len(blocks) - len(todo)}
    log(f"  {stats['prompts']} prompts in {len(blocks)} blocks; {stats['blocks_resumed']} already sampled")
    start, out_tokens = time.time(), 0
    # Prompts too long for the engine's context: rows say so; counted (resumed blocks too), never fatal.
    skipped = [pid for key in blocks if key not in set(todo)
               for pid in _skipped_prompt_ids(store.read_rows(block_path(jobs[key[0]].work_dir, key[1])))]
    generate_s: dict[int, float] = {}  # block -> seconds the engine spent generating it
    if todo:
        items = [{"prompt_ids": [p["prompt_id"] for p in blocks[j, b]],
                  "problems": [p["problem"] for p in blocks[j, b]], "template": jobs[j].template}
                 for j, b in todo]
        engines = engine_pool.acquire(spec, min(num_engines, len(items)), gpus_per_engine)
        healthy = False
        try:
            for k, rows, seconds in _sample_blocks([e.actor for e in engines], items):
                generate_s[k] = seconds  # the actor's generate time for the block
                rows = sorted(rows, key=lambda r: (r["prompt_id"], r["sample_idx"]))
                skipped += _skipped_prompt_ids(rows)
                out_tokens += sum(r["num_tokens"] for r in rows)
                j, b = todo[k]
                store.write_rows(block_path(jobs[j].work_dir, b), rows, SAMPLE_SCHEMA)
                elapsed = time.time() - start
                log(f"  block {b}{f' of set {j}' if len(jobs) > 1 else ''}: {len(rows)} samples; "
                    f"{len(generate_s)}/{len(todo)} blocks, {out_tokens / max(elapsed, 1e-9):.0f} output tok/s")
                after_block()
                if TEST_BLOCK_DELAY_S:
                    time.sleep(TEST_BLOCK_DELAY_S)
            healthy = True
        finally:
            engine_pool.release(engines, healthy)
    seconds = time.time() - start
    if skipped:
        log(f"  {len(skipped)} prompt(s) skipped: no room to generate within the engine's max_model_len "
            f"(e.g. {', '.join(skipped[:3])})")
    stats.update({"prompts_skipped_too_long": len(skipped), "skipped_prompt_ids": skipped[:MAX_NAMED]})
    stats.update({"seconds": round(seconds, 2), "generate_s": round(sum(generate_s.values()), 2),
                  "output_tokens": out_tokens,
                  "output_tokens_per_s": round(out_tokens / seconds, 1) if todo and seconds else None})
    files = [[block_path(job.work_dir, b) for (j, b) in blocks if j == jn] for jn, job in enumerate(jobs)]
    return files, stats


def _sample_blocks(actors: list, items: list[dict], in_flight: int = 2):
    """(block index, rows, generate seconds) as each block comes back; every actor has up
    to `in_flight` blocks queued, so it never waits for the driver between blocks."""
    import ray

    todo = list(enumerate(items))
    running: dict = {}

    def submit(actor) -> None:
        k, item = todo.pop(0)
        running[actor.sample_block.remote(item)] = (k, actor)

    for actor in actors:
        for _ in range(in_flight):
            if todo:
                submit(actor)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        k, actor = running.pop(ref)
        rows, seconds = ray.get(ref)
        if todo:
            submit(actor)
        yield k, rows, seconds
