"""Training objectives: small pure functions of per-token target log-probs.

Notation (see DESIGN.md, "Objectives — one family"): l_t = log pi(y_t | x, y_<t) from
`actors.token_logprobs`, m_t = 1 on response tokens, ref = the reference model's l_t,
N = `normalizer` = the number of response tokens (pairs, for DPO) in the GLOBAL batch,
over all ranks and gradient-accumulation steps. Every loss returns sum / N, never a
local mean, so summing micro-batch gradients gives exactly the full-batch gradient
however the tokens are split (the DFT reference code's issue #27 is this bug).

All inputs are [B, T] tensors except DPO's, which are per-sequence sums [P].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Hellinger's psi(u) = u / (1 + u) has a pole at u = -1; see _psi_hellinger.
HELLINGER_EPS = 1e-2


def sft_loss(logp: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Cross-entropy: -sum m l / N. RFT is this loss on verified positives."""
    return -(mask * logp).sum() / normalizer


def dft_loss(logp: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Dynamic Fine-Tuning (arXiv 2508.05629): -sum m sg(p) l / N, with p = exp(l).

    Since grad l = grad p / p, the gradient is -grad sum m p / N: each token's SFT
    gradient is rescaled by its own (detached) probability.
    """
    return -(mask * logp.detach().exp() * logp).sum() / normalizer


def _psi_hellinger(u: Tensor) -> Tensor:
    # psi is -inf at u = -1 (the policy fell ~1/beta nats below the reference). Clamp
    # the value but keep a gradient there (straight-through), so such tokens get the
    # largest weight 1/eps^2 instead of silently dropping out of the loss.
    clamped = u + (u.clamp(min=-1.0 + HELLINGER_EPS) - u).detach()
    return clamped / (1.0 + clamped)


# psi(u) = -f*(-u) for the variational form of D_f (f* = convex conjugate); the loss is
# -sum m psi(beta r) / N and the per-token weight on the SFT gradient is psi'(beta r).
PSI: dict[str, Callable[[Tensor], Tensor]] = {
    "tv": lambda u: u,  # weight 1: SFT, the reference drops out
    "chi2": lambda u: u - u.square() / 4,  # weight 1 - u/2
    "hellinger": _psi_hellinger,  # weight 1/(1+u)^2
}


def fdiv_loss(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, normalizer: float, beta: float, divergence: str
) -> Tensor:
    """f-divergence SFT (arXiv 2507.00018): -sum m psi(beta (l - ref)) / N.

    d loss / d l_t = -beta psi'(u_t) m_t / N: SFT reweighted per token by how far the
    policy has moved from the reference, so updates stay anchored to pi_ref (except
    for "tv", whose gradient is beta times SFT's).
    """
    if divergence not in PSI:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {sorted(PSI)}")
    u = beta * (logp - ref_logp.detach())
    return -(mask * PSI[divergence](u)).sum() / normalizer


def sequence_logp(logp: Tensor, mask: Tensor) -> Tensor:
    """Sum of response-token log-probs per row: [B, T] -> [B] (DPO's input)."""
    return (mask * logp).sum(dim=-1)


def _dpo_delta(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float) -> Tensor:
    return beta * ((chosen - ref_chosen.detach()) - (rejected - ref_rejected.detach()))


def dpo_loss(
    chosen_logp_sum: Tensor,
    rejected_logp_sum: Tensor,
    ref_chosen_sum: Tensor,
    ref_rejected_sum: Tensor,
    beta: float,
    normalizer: float,
) -> Tensor:
    """DPO: -sum log sigmoid(Delta) / N over pairs, N = global number of pairs.

    Delta = beta ((c - c_ref) - (r - r_ref)). Per token of the chosen answer the logit
    gradient is beta sigmoid(-Delta) (softmax - onehot) / N, the rejected answer's is
    its negative, so tokens the two share (same prefix, same log-probs) cancel.
    """
    delta = _dpo_delta(chosen_logp_sum, rejected_logp_sum, ref_chosen_sum, ref_rejected_sum, beta)
    return -F.logsigmoid(delta).sum() / normalizer


@torch.no_grad()
def dpo_stats(
    chosen_logp_sum: Tensor,
    rejected_logp_sum: Tensor,
    ref_chosen_sum: Tensor,
    ref_rejected_sum: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """Local means over pairs: implicit rewards beta (logp - ref), their margin Delta,
    and preference accuracy (share of pairs with Delta > 0)."""
    chosen_reward = beta * (chosen_logp_sum - ref_chosen_sum)
    rejected_reward = beta * (rejected_logp_sum - ref_rejected_sum)
    margin = chosen_reward - rejected_reward
    return {
        "chosen_reward": chosen_reward.float().mean(),
        "rejected_reward": rejected_reward.float().mean(),
        "reward_margin": margin.float().mean(),
        "accuracy": (margin > 0).float().mean(),
        # DPO as reweighted SFT: each pair's update is scaled by sigmoid(-Delta).
        "pair_weight": torch.sigmoid(-margin.float()).mean(),
    }


def pair_weight_histogram(margin: Tensor, bins: int = 10) -> Tensor:
    """Counts of DPO pair weights sigmoid(-Delta) in `bins` equal bins over [0, 1]."""
    return torch.histc(torch.sigmoid(-margin.float()), bins=bins, min=0.0, max=1.0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (mask * x).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def mean_token_prob(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean probability of the target token over response tokens (DFT's weight)."""
    return _masked_mean(logp.float().exp(), mask)


@torch.no_grad()
def mean_implicit_reward(logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Mean per-token implicit reward beta (l - ref) over response tokens."""
    return _masked_mean(beta * (logp.float() - ref_logp.float()), mask)


@torch.no_grad()
def kl_estimate(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref): mean of exp(d) - d - 1 with d = ref - l.

    Non-negative per token, and unbiased when tokens are sampled from pi; here they are
    training-data tokens, so read it as a drift indicator, not an exact KL.
    """
    d = ref_logp.float() - logp.float()
    return _masked_mean(torch.expm1(d) - d, mask)


@dataclass(frozen=True)
class ObjectiveSpec:
    """How the train loop feeds an objective.

    Call shapes: no reference -> loss(logp, mask, normalizer); needs_reference ->
    loss(logp, ref_logp, mask, normalizer, beta); uses_pairs -> loss(chosen_sum,
    rejected_sum, ref_chosen_sum, ref_rejected_sum, beta, normalizer).
    """

    loss: Callable[..., Tensor]
    needs_reference: bool
    uses_pairs: bool
    default_data: str  # "gold" | "positives" | "pairs"


OBJECTIVE_SPECS: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(sft_loss, needs_reference=False, uses_pairs=False, default_data="gold"),
    "rft": ObjectiveSpec(sft_loss, needs_reference=False, uses_pairs=False, default_data="positives"),
    "dft": ObjectiveSpec(dft_loss, needs_reference=False, uses_pairs=False, default_data="positives"),
    "dpo": ObjectiveSpec(dpo_loss, needs_reference=True, uses_pairs=True, default_data="pairs"),
    # TV's reference term is constant, so its gradient is beta * SFT's; it still runs
    # through fdiv_loss (and a reference pass) so the f-divergence rows of a results
    # table are computed by one code path.
    **{
        name: ObjectiveSpec(
            functools.partial(fdiv_loss, divergence=name),
            needs_reference=True,
            uses_pairs=False,
            default_data="positives",
        )
        for name in ("tv", "chi2", "hellinger")
    },
}
