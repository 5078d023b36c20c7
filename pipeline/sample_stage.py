"""Sample stage: prompts -> `n` completions each, through Ray Data into a pool of vLLM
actors. Output is written in blocks of prompts; a rerun after a crash samples only the
blocks that are missing, so every (prompt, sample) ends up exactly once."""
from __future__ import annotations

import os
import time

import pyarrow as pa

from actors.sampler import EngineSpec, VLLMSampler
from pipeline.prompt_templates import render_prompt

SAMPLE_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("prompt", pa.string()),
                           ("completion", pa.string()), ("finish_reason", pa.string()), ("num_tokens", pa.int32())])


# Test hook: a pause after each written block, so a test can stop a job mid-stage.
TEST_BLOCK_DELAY_S = float(os.environ.get("VERIFINE_TEST_BLOCK_DELAY_S", "0"))


def block_path(work_dir: str, block_id: int) -> str:
    return f"{work_dir}/block-{block_id:05d}.parquet"


def sample_blocks(store, work_dir: str, problems: list[dict], model_path: str, template: str,
                  spec: EngineSpec, num_engines: int, gpus_per_engine: int, block_size: int,
                  log=print) -> tuple[list[str], dict]:
    """Sample every problem (rows with prompt_id, problem) into block files under
    work_dir; blocks already present are kept. Returns (block files, stats)."""
    import ray

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    blocks = [problems[i:i + block_size] for i in range(0, len(problems), block_size)]
    todo = [b for b in range(len(blocks)) if not store.exists(block_path(work_dir, b))]
    log(f"  {len(problems)} prompts in {len(blocks)} blocks; {len(blocks) - len(todo)} already sampled")
    stats = {"prompts": len(problems), "blocks": len(blocks), "blocks_resumed": len(blocks) - len(todo)}
    start, out_tokens = time.time(), 0
    if todo:
        items = [{"block_id": b,
                  "prompt_ids": [p["prompt_id"] for p in blocks[b]],
                  "prompts": [render_prompt(tokenizer, template, p["problem"]) for p in blocks[b]]}
                 for b in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # One block per batch: an actor's output for a block arrives complete.
        ds = ds.map_batches(VLLMSampler, fn_constructor_kwargs={"spec": spec.to_dict()}, batch_size=1,
                            concurrency=min(num_engines, len(items)), num_gpus=gpus_per_engine or None,
                            num_cpus=1 if not gpus_per_engine else None)
        pending: dict[int, list[dict]] = {}
        expected = {b: len(blocks[b]) * spec.n for b in todo}
        done = 0
        for batch in ds.iter_rows():
            b = int(batch["block_id"])
            row = {k: batch[k] for k in SAMPLE_SCHEMA.names}
            pending.setdefault(b, []).append(row)
            if len(pending[b]) == expected[b]:
                rows = sorted(pending.pop(b), key=lambda r: (r["prompt_id"], r["sample_idx"]))
                out_tokens += sum(r["num_tokens"] for r in rows)
                store.write_rows(block_path(work_dir, b), rows, SAMPLE_SCHEMA)
                done += 1
                elapsed = time.time() - start
                log(f"  block {b}: {len(rows)} samples; {done}/{len(todo)} blocks, "
                    f"{out_tokens / max(elapsed, 1e-9):.0f} output tok/s")
                if TEST_BLOCK_DELAY_S:
                    time.sleep(TEST_BLOCK_DELAY_S)
        if pending:
            raise RuntimeError(f"sampler returned incomplete blocks {sorted(pending)}")
    seconds = time.time() - start
    stats.update({"seconds": round(seconds, 2), "output_tokens": out_tokens,
                  "output_tokens_per_s": round(out_tokens / seconds, 1) if todo and seconds else None})
    return [block_path(work_dir, b) for b in range(len(blocks))], stats
