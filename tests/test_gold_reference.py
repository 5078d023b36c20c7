"""f-divergence SFT on gold demonstrations: reference log-probs on gold solutions align
token by token with the policy's (the same prompt rendering, tokenizer and encoding as
the train loop), and the objectives' gradient identities hold on that real data."""
import pytest
import torch

from actors.objectives import OBJECTIVE_SPECS
from actors.reference import ReferenceScorer
from actors.sequences import pad_batch
from actors.store import RunStore
from actors.token_logprobs import causal_lm_token_logprobs
from actors.train_loop import load_units
from pipeline.toy_task import make_problems, prompt_row

BETA = 0.5


@pytest.fixture(scope="module")
def gold(toy_model, tmp_path_factory):
    """Gold rows in a run store, their reference log-probs scored as the reference stage
    does (ReferenceScorer renders the prompt from the problem), and the train loop's units."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = RunStore(str(tmp_path_factory.mktemp("gold")))
    rows = [prompt_row(p) for p in make_problems("train", 6, seed=1)]
    store.write_rows("prompts.parquet", rows)
    scorer = ReferenceScorer(toy_model, 256)
    scored = scorer.score_rows([{"problem": r["problem"], "completion": r["solution"]} for r in rows],
                               ["completion"], template="chat")
    store.write_rows("ref.parquet", [{"prompt_id": r["prompt_id"], "sample_idx": 0,
                                      "ref_completion": list(map(float, s["ref_completion"]))}
                                     for r, s in zip(rows, scored)])
    tokenizer = AutoTokenizer.from_pretrained(toy_model)
    cfg = {"store_uri": store.uri, "data_file": "prompts.parquet", "reference_file": "ref.parquet", "data": "gold",
           "template": "chat", "max_len": 256}
    units = load_units(cfg, tokenizer)  # raises if a reference does not match its row's response length
    model = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    return units, model, tokenizer


def _policy(model, units, pad_id):
    batch = pad_batch([u["ex"] for u in units], pad_id, [u["ref"] for u in units])
    logp = causal_lm_token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_tokens=64)
    return logp, batch["ref_logp"], batch["mask"].float()


def test_gold_reference_log_probs_align_token_by_token_with_the_policy(gold):
    units, model, tok = gold
    with torch.no_grad():
        logp, ref, mask = _policy(model, units, tok.pad_token_id or tok.eos_token_id)
    assert len(units) == 6 and mask.sum() > 50
    torch.testing.assert_close(logp * mask, ref * mask, atol=1e-5, rtol=0)  # the same model: the same numbers


@pytest.mark.parametrize("name", ["tv", "chi2", "hellinger"])
def test_fdiv_gradient_is_beta_times_sft_at_the_reference_on_gold(gold, name):
    """At pi = pi_ref every f-divergence weight psi'(0) is 1: the gradient is beta times
    SFT's, on real gold tokens; TV's stays beta times SFT's whatever the reference."""
    units, model, tok = gold
    pad = tok.pad_token_id or tok.eos_token_id
    N = float(sum(mask.sum() for mask in [_policy(model, units, pad)[2]]))

    def grads(loss_fn):
        model.zero_grad()
        logp, ref, mask = _policy(model, units, pad)
        loss_fn(logp, ref, mask).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    sft = grads(lambda logp, ref, mask: OBJECTIVE_SPECS["sft"].loss(logp, mask, N))
    fdiv = grads(lambda logp, ref, mask: OBJECTIVE_SPECS[name].loss(logp, ref, mask, N, BETA))
    for a, b in zip(fdiv, sft):
        torch.testing.assert_close(a, BETA * b, atol=1e-6, rtol=1e-4)
    if name == "tv":
        shifted = grads(lambda logp, ref, mask: OBJECTIVE_SPECS["tv"].loss(logp, ref - 0.7, mask, N, BETA))
        for a, b in zip(shifted, sft):
            torch.testing.assert_close(a, BETA * b, atol=1e-6, rtol=1e-4)
