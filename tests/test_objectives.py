"""Gradient identities of the objectives and exactness of chunked token log-probs.

Each identity is checked against an independent computation (naive full-vocabulary
log_softmax, or the closed-form gradient from DESIGN.md), so a wrong sign, a missing
stop-gradient, a local-mean normaliser or a leaked [N, V] buffer makes a test fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from actors.objectives import (
    HELLINGER_EPS,
    OBJECTIVE_SPECS,
    dft_loss,
    dpo_loss,
    dpo_stats,
    fdiv_loss,
    kl_estimate,
    mean_implicit_reward,
    mean_token_prob,
    sequence_logp,
    sft_loss,
)
from actors.token_logprobs import causal_lm_token_logprobs, token_logprobs

V = 50  # vocabulary of the bare-logits tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors here are tiny: on a busy 2-core machine, OpenMP hand-offs between two
    # threads cost ~20 ms per op and dominate the run time.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_token_logprobs(hidden, weight, targets, bias=None):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def gather_logp(logits, targets):
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)  # tests reuse graphs


def tiny_model(tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return Qwen2ForCausalLM(cfg).eval()  # eval: no dropout, deterministic


def param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def assert_grads_close(a, b, atol=1e-6, rtol=1e-5):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("chunk", [1, 7, 26, 1000])  # 26 = all tokens; 7 does not divide 26
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_logprobs_matches_naive(chunk, dtype, tol, with_bias):
    g = torch.Generator().manual_seed(chunk)
    B, T, H = 2, 13, 16
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if with_bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=dtype)  # arbitrary per-token loss weights
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    ours = token_logprobs(hidden, weight, targets, chunk_tokens=chunk, lm_head_bias=bias)
    ref = naive_token_logprobs(hidden, weight, targets, bias).to(ours.dtype)
    assert ours.shape == (B, T) and ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    assert_grads_close(grads((ours * upstream).sum(), inputs), grads((ref * upstream).sum(), inputs), atol=tol, rtol=tol)


def test_token_logprobs_gradcheck():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    assert torch.autograd.gradcheck(lambda h, w, b: token_logprobs(h, w, targets, 4, b), (hidden, weight, bias))


def test_token_logprobs_bf16_inputs_give_fp32_logprobs():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(V, 16, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (2, 9), generator=g)

    ours = token_logprobs(hidden, weight, targets, chunk_tokens=4)
    ref = naive_token_logprobs(hidden, weight, targets)  # bf16 matmul, fp32 softmax: what HF does
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours_g = grads(ours.sum(), [hidden, weight])
    ref_g = grads(ref.sum(), [hidden, weight])
    assert [x.dtype for x in ours_g] == [torch.bfloat16, torch.bfloat16]
    # bf16 rounding of the [N, V] softmax gradient differs between the two paths.
    assert_grads_close([x.float() for x in ours_g], [x.float() for x in ref_g], atol=5e-2, rtol=2e-2)


def test_token_logprobs_under_autocast_matches_naive():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = torch.randn(200, 32, generator=g, requires_grad=True)  # fp32 master weights
    targets = torch.randint(0, 200, (64,), generator=g)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = fn()
        return (logp, *grads(logp.sum(), [hidden, weight]))

    ours = run(lambda: token_logprobs(hidden, weight, targets, chunk_tokens=10))
    ref = run(lambda: naive_token_logprobs(hidden, weight, targets))
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    # Backward must recompute the bf16 logits that forward normalised (else ~0.15 off).
    torch.testing.assert_close(ours[1], ref[1], atol=1e-3, rtol=1e-3)
    # Ours accumulates the weight gradient in fp32, the naive path in a bf16 matmul.
    torch.testing.assert_close(ours[2], ref[2], atol=5e-2, rtol=2e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_token_logprobs_never_materialises_full_logits():
    N, H, chunk = 40, 16, 8
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    bound = V * max(chunk, H)  # one chunk of logits, or the weight (gradient) itself
    assert bound < N * V

    with LargestTensor() as naive:
        naive_token_logprobs(hidden, weight, targets).sum().backward()
    assert naive.largest >= N * V  # the probe does see full logits

    with LargestTensor() as ours:
        token_logprobs(hidden, weight, targets, chunk_tokens=chunk).sum().backward()
    assert "scatter_add_" in {op.split(".")[0] for op in ours.ops}  # backward ran under the probe
    assert ours.largest <= bound


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_token_logprobs_matches_model_logits(tied):
    model = tiny_model(tied).double()
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 64, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    weights = torch.randn(3, 9, generator=g, dtype=torch.float64)

    ours = causal_lm_token_logprobs(model, input_ids, attention_mask, chunk_tokens=7)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref = gather_logp(logits[:, :-1].double(), input_ids[:, 1:])
    assert ours.shape == (3, 9)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    assert_grads_close(param_grads(model, (ours * weights).sum()), param_grads(model, (ref * weights).sum()), 1e-10, 1e-8)


def test_score_mask_scores_only_the_response_positions():
    """The head runs on the masked (response) positions only: the same log-probs and
    gradients there as the full computation, 0 (and no gradient) elsewhere."""
    model = tiny_model(True).double()
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 64, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    mask = torch.zeros(3, 9, dtype=torch.float64)
    mask[0, 3:] = 1
    mask[1, 6:] = 1
    mask[2, 2:5] = 1
    weights = torch.randn(3, 9, generator=g, dtype=torch.float64)

    full = causal_lm_token_logprobs(model, input_ids, attention_mask, chunk_tokens=4)
    scored = causal_lm_token_logprobs(model, input_ids, attention_mask, chunk_tokens=4, score_mask=mask)
    torch.testing.assert_close(scored, full * mask, atol=1e-12, rtol=1e-12)
    assert (scored[mask == 0] == 0).all() and (full[mask == 0] != 0).all()
    assert_grads_close(param_grads(model, (scored * mask * weights).sum()),
                       param_grads(model, (full * mask * weights).sum()), 1e-10, 1e-8)


# ---------------------------------------------------------------- SFT / DFT / f-divergence


def bare_batch(seed, B=3, T=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dtype)
    return logits, targets, mask, g


def test_dft_gradient_is_minus_gradient_of_token_prob():
    logits, targets, mask, _ = bare_batch(5)
    N = 3.0 * mask.sum()  # the global count exceeds this micro-batch's
    logp = gather_logp(logits, targets)
    (ours,) = grads(dft_loss(logp, mask, N), [logits])
    (expected,) = grads(-(mask * logp.exp()).sum() / N, [logits])
    torch.testing.assert_close(ours, expected)
    (sft,) = grads(sft_loss(gather_logp(logits, targets), mask, N), [logits])
    assert not torch.allclose(ours, sft)  # DFT is not SFT: each token is rescaled by p_t


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_tv_is_sft_whatever_the_reference(beta):
    logits, targets, mask, g = bare_batch(6)
    N = mask.sum()
    logp = gather_logp(logits, targets)
    for ref in (torch.randn(logp.shape, generator=g, dtype=logp.dtype), logp.detach() - 2.0):
        tv = fdiv_loss(logp, ref, mask, N, beta, "tv")
        sft = sft_loss(logp, mask, N)
        # Value: beta * SFT plus a term of the reference alone (constant in the policy).
        torch.testing.assert_close(tv, beta * sft + beta * (mask * ref).sum() / N)
        (g_tv,) = grads(tv, [logits])
        (g_sft,) = grads(sft, [logits])
        torch.testing.assert_close(g_tv, beta * g_sft)


WEIGHTS = {"chi2": lambda u: 1 - u / 2, "hellinger": lambda u: 1 / (1 + u) ** 2}


@pytest.mark.parametrize("divergence", ["chi2", "hellinger"])
def test_fdiv_per_token_weights(divergence):
    g = torch.Generator().manual_seed(7)
    beta, N = 0.5, 40.0
    logp = (-3 * torch.rand(4, 8, generator=g, dtype=torch.float64)).requires_grad_()
    ref = logp.detach() - torch.empty(4, 8, dtype=torch.float64).uniform_(-1.6, 4.0, generator=g)
    mask = (torch.rand(4, 8, generator=g) > 0.25).double()
    u = beta * (logp.detach() - ref)
    assert u.min() > -1 + HELLINGER_EPS and u.max() > 1  # unclamped, and weights far from 1

    (d_logp,) = grads(fdiv_loss(logp, ref, mask, N, beta, divergence), [logp])
    torch.testing.assert_close(d_logp, -beta * WEIGHTS[divergence](u) * mask / N)


def test_hellinger_clamps_value_but_keeps_largest_weight():
    beta, N = 1.0, 2.0
    logp = torch.tensor([[-9.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)  # u = -8 (past the pole), 0
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss = fdiv_loss(logp, ref, mask, N, beta, "hellinger")
    assert torch.isfinite(loss)
    (d_logp,) = grads(loss, [logp])
    torch.testing.assert_close(d_logp, torch.tensor([[-1 / HELLINGER_EPS**2, -1.0]], dtype=torch.float64) / N)


def test_fdiv_rejects_unknown_divergence():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="kl"):
        fdiv_loss(x, x, x, 1.0, 0.1, "kl")


# ---------------------------------------------------------------- DPO


def onehot(targets):
    return F.one_hot(targets, V).to(torch.float64)


def test_dpo_logit_gradients_are_reweighted_sft():
    beta, P, T = 0.4, 4, 5
    g = torch.Generator().manual_seed(8)
    chosen = torch.randn(P, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(P, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    y_c, y_r = torch.randint(0, V, (2, P, T), generator=g)
    m_c = (torch.rand(P, T, generator=g) > 0.3).double()
    m_r = (torch.rand(P, T, generator=g) > 0.3).double()
    ref_c, ref_r = -10 * torch.rand(2, P, generator=g, dtype=torch.float64)
    N = 2.0 * P  # global pairs

    c_sum = sequence_logp(gather_logp(chosen, y_c), m_c)
    r_sum = sequence_logp(gather_logp(rejected, y_r), m_r)
    g_c, g_r = grads(dpo_loss(c_sum, r_sum, ref_c, ref_r, beta, N), [chosen, rejected])

    delta = beta * ((c_sum - ref_c) - (r_sum - ref_r)).detach()
    scale = (beta * torch.sigmoid(-delta) / N)[:, None, None]
    torch.testing.assert_close(g_c, scale * (chosen.detach().softmax(-1) - onehot(y_c)) * m_c[..., None])
    torch.testing.assert_close(g_r, -scale * (rejected.detach().softmax(-1) - onehot(y_r)) * m_r[..., None])


def test_dpo_shared_prefix_logits_get_zero_net_gradient():
    beta, k = 0.1, 4
    g = torch.Generator().manual_seed(9)
    prefix = torch.randn(k, V, generator=g, dtype=torch.float64, requires_grad=True)  # computed once
    tail_c = torch.randn(3, V, generator=g, dtype=torch.float64, requires_grad=True)
    tail_r = torch.randn(5, V, generator=g, dtype=torch.float64, requires_grad=True)  # lengths differ
    y_prefix = torch.randint(0, V, (k,), generator=g)
    y_c = torch.cat([y_prefix, torch.randint(0, V, (3,), generator=g)])
    y_r = torch.cat([y_prefix, torch.randint(0, V, (5,), generator=g)])

    c_sum = gather_logp(torch.cat([prefix, tail_c]), y_c).sum()[None]
    r_sum = gather_logp(torch.cat([prefix, tail_r]), y_r).sum()[None]
    loss = dpo_loss(c_sum, r_sum, torch.tensor([-3.0]), torch.tensor([-4.0]), beta, 1.0)
    g_prefix, g_c, g_r = grads(loss, [prefix, tail_c, tail_r])
    torch.testing.assert_close(g_prefix, torch.zeros_like(g_prefix), atol=1e-15, rtol=0)
    assert g_c.abs().max() > 1e-3 and g_r.abs().max() > 1e-3


def test_dpo_shared_response_prefix_cancels_in_a_real_model():
    """Chosen and rejected share prompt + the first response tokens, in one batch:
    scoring the shared response tokens or not changes neither loss nor gradient."""
    model = tiny_model(tied=True).double()
    g = torch.Generator().manual_seed(10)
    prompt_len, shared_len, tail_len = 4, 3, 4
    shared = torch.randint(0, 64, (prompt_len + shared_len,), generator=g)
    tails = torch.randint(0, 64, (2, tail_len), generator=g)
    input_ids = torch.cat([shared.expand(2, -1), tails], dim=1)  # row 0 chosen, row 1 rejected
    logp = causal_lm_token_logprobs(model, input_ids, torch.ones_like(input_ids), chunk_tokens=5)

    pos = torch.arange(1, input_ids.shape[1])[None].expand(2, -1)  # position of each target
    whole_response = (pos >= prompt_len).double()
    tail_only = (pos >= prompt_len + shared_len).double()
    ref = torch.tensor([-30.0, -28.0], dtype=torch.float64)

    def loss(mask):
        s = sequence_logp(logp, mask)
        return dpo_loss(s[:1], s[1:], ref[:1], ref[1:], 0.1, 1.0)

    torch.testing.assert_close(loss(whole_response), loss(tail_only))
    g_whole = param_grads(model, loss(whole_response))
    g_tail = param_grads(model, loss(tail_only))
    # Qwen2's RMSNorm computes in fp32 even in a float64 model: fp32-level tolerance.
    assert_grads_close(g_whole, g_tail, atol=1e-7, rtol=1e-5)
    # The shared tokens do carry gradient when scored on one side only.
    g_one_side = param_grads(model, loss(torch.stack([whole_response[0], tail_only[1]])))
    assert not all(torch.allclose(a, b, atol=1e-5, rtol=1e-3) for a, b in zip(g_one_side, g_tail))


def test_dpo_stats():
    c = torch.tensor([-5.0, -9.0, -2.0])
    r = torch.tensor([-6.0, -4.0, -3.0])
    ref_c = torch.tensor([-5.0, -5.0, -5.0])
    ref_r = torch.tensor([-5.0, -5.0, -5.0])
    s = dpo_stats(c, r, ref_c, ref_r, beta=0.5)
    torch.testing.assert_close(s["reward_margin"], torch.tensor(0.5 * (1 - 5 + 1) / 3))
    torch.testing.assert_close(s["accuracy"], torch.tensor(2 / 3))
    torch.testing.assert_close(s["chosen_reward"], torch.tensor(0.5 * (0 - 4 + 3) / 3))


def test_dpo_pair_weight_is_the_weight_of_each_pairs_sft_like_update():
    """d loss / d (sum log p of the chosen answer) = -beta * sigmoid(-Delta) / N: the pair
    weight the metrics report is that sigmoid(-Delta), and its histogram counts pairs."""
    from actors.objectives import dpo_loss, pair_weight_histogram

    beta = 0.5
    c = torch.tensor([-5.0, -9.0, -2.0, -7.0], requires_grad=True)
    r, ref_c, ref_r = torch.tensor([-6.0, -4.0, -3.0, -7.5]), torch.full((4,), -5.0), torch.full((4,), -5.0)
    dpo_loss(c, r, ref_c, ref_r, beta, 4).backward()
    weights = -c.grad * 4 / beta
    s = dpo_stats(c.detach(), r, ref_c, ref_r, beta)
    torch.testing.assert_close(s["pair_weight"], weights.mean())
    margin = beta * ((c.detach() - ref_c) - (r - ref_r))
    hist = pair_weight_histogram(margin, bins=10)
    assert hist.sum().item() == 4
    assert all(hist[min(int(w * 10), 9)] > 0 for w in weights.tolist())


# ---------------------------------------------------------------- normalisation


def _objective_loss(name, logp, ref, mask, N, beta=0.5):
    spec = OBJECTIVE_SPECS[name]
    if spec.uses_pairs:  # rows are (chosen, rejected) interleaved
        s = sequence_logp(logp, mask)
        return spec.loss(s[0::2], s[1::2], ref[0::2].sum(-1), ref[1::2].sum(-1), beta, N)
    if spec.needs_reference:
        return spec.loss(logp, ref, mask, N, beta)
    return spec.loss(logp, mask, N)


@pytest.mark.parametrize("name", sorted(OBJECTIVE_SPECS))
def test_micro_batches_with_global_normalizer_sum_to_full_batch(name):
    model = tiny_model(tied=False).double()
    g = torch.Generator().manual_seed(11)
    input_ids = torch.randint(0, 64, (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.zeros(4, 11, dtype=torch.float64)
    for row, start in enumerate([2, 9, 4, 6]):  # uneven response lengths per micro-batch
        mask[row, start:] = 1
    # Near the untrained model's log-probs (~ -log 64), so Hellinger stays unclamped.
    ref = -4.2 + 2 * torch.rand(4, 11, generator=g, dtype=torch.float64) - 1
    uses_pairs = OBJECTIVE_SPECS[name].uses_pairs
    N = 2.0 if uses_pairs else mask.sum()  # global pairs or global response tokens
    splits = [slice(0, 2), slice(2, 4)]  # micro-batches (whole pairs for DPO)

    def step(rows, norm):
        logp = causal_lm_token_logprobs(model, input_ids[rows], attention_mask[rows], chunk_tokens=5)
        return param_grads(model, _objective_loss(name, logp, ref[rows], mask[rows], norm))

    full = step(slice(0, 4), N)
    accumulated = [sum(parts) for parts in zip(*(step(s, N) for s in splits))]
    assert_grads_close(full, accumulated, atol=1e-6, rtol=1e-4)

    # The bug this guards against: each micro-batch normalised by its own count.
    local = [sum(parts) for parts in zip(*(step(s, N if uses_pairs else mask[s].sum()) for s in splits))]
    if uses_pairs:  # pairs split evenly, so instead check a local *mean per pair* of 1
        local = [sum(parts) for parts in zip(*(step(s, 1.0) for s in splits))]
    assert not all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(full, local))


# ---------------------------------------------------------------- specs and diagnostics


def test_objective_specs():
    assert set(OBJECTIVE_SPECS) == {"sft", "rft", "dft", "dpo", "chi2", "hellinger", "tv"}
    data = {name: spec.default_data for name, spec in OBJECTIVE_SPECS.items()}
    assert data == {"sft": "gold", "rft": "positives", "dft": "positives", "dpo": "pairs",
                    "chi2": "positives", "hellinger": "positives", "tv": "positives"}  # fmt: skip
    assert {n for n, s in OBJECTIVE_SPECS.items() if s.needs_reference} == {"dpo", "chi2", "hellinger", "tv"}
    assert {n for n, s in OBJECTIVE_SPECS.items() if s.uses_pairs} == {"dpo"}
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    chi2 = _objective_loss("chi2", logp, ref, mask, 3.0, beta=1.0)
    u = torch.tensor([0.5, -1.0, -1.0])
    torch.testing.assert_close(chi2, -(u - u**2 / 4).sum() / 3)
    with pytest.raises(Exception):
        OBJECTIVE_SPECS["sft"].needs_reference = True  # frozen


def test_diagnostics():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(mean_token_prob(logp, mask), torch.tensor((0.5 + 0.25 + 0.9) / 3))
    ref = logp - torch.tensor([[1.0, -1.0], [5.0, 2.0]])
    torch.testing.assert_close(mean_implicit_reward(logp, ref, mask, 0.1), torch.tensor(0.1 * 2 / 3))
    assert kl_estimate(logp, logp, mask) == 0
    d = torch.tensor([-1.0, 1.0, -2.0])  # ref - l on masked tokens
    torch.testing.assert_close(kl_estimate(logp, ref, mask), (d.exp() - d - 1).mean())
    assert not mean_token_prob(logp.requires_grad_(), mask).requires_grad
