"""Per-token target log-probs without materialising [batch, seq, vocab] logits.

Every objective in `actors.objectives` is a function of l_t = log pi(y_t | y_<t), so this
is the one place that touches the vocabulary. With Qwen's 151,936-token vocabulary a
single 4k-token micro-batch would need ~2.5 GB per fp32 logits copy, and the naive
`log_softmax(...).gather(...)` keeps several such copies alive through backward. Here
the flattened tokens are processed in chunks: forward keeps only the per-token
logsumexp, backward recomputes each chunk's logits (one extra matmul) and turns them
into the softmax gradient in place.

Limits: the LM head must be a plain linear layer (no logit soft-capping or scaling), and
its weight must be materialised when `token_logprobs` runs: under ZeRO-3 call it through
`LogprobHead`, a module owning the weight, so DeepSpeed gathers it around that call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ W^T + b)[target] over flattened tokens, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        compute_dtype, acc_dtype = _dtypes(hidden, weight)
        w, b = _as(weight, compute_dtype), _as(bias, compute_dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        lse = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = _chunk_logits(hidden[s:e], w, b, compute_dtype, acc_dtype)
            target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)
            # logsumexp in place: saves torch.logsumexp's extra [chunk, V] temporary.
            row_max = logits.amax(dim=1, keepdim=True)
            chunk_lse = logits.sub_(row_max).exp_().sum(dim=1).log_().add_(row_max.squeeze(1))
            out[s:e] = target_logit - chunk_lse
            lse[s:e] = chunk_lse
            del logits  # free before the next chunk allocates its own
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.autocast = _autocast_state(hidden.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # Recompute logits under the forward's autocast state, or softmax != exp(z - lse).
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return _ChunkedTokenLogprobs._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype, acc_dtype = _dtypes(hidden, weight)
        w, b = _as(weight, compute_dtype), _as(bias, compute_dtype)
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Weight/bias grads summed over many chunks: accumulate in fp32 (or wider).
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        grad_out = grad_out.to(acc_dtype)
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            h = hidden[s:e].to(compute_dtype)
            g = grad_out[s:e, None]
            # d l_t / d logits = onehot(y_t) - softmax; built in the recomputed buffer.
            d_logits = _chunk_logits(h, w, b, compute_dtype, acc_dtype)
            d_logits.sub_(lse[s:e, None]).exp_().mul_(-g)
            d_logits.scatter_add_(1, targets[s:e, None], g)
            if need_b:
                grad_b += d_logits.sum(dim=0)
            d_logits = d_logits.to(compute_dtype)
            if need_h:
                grad_h[s:e] = d_logits @ w
            if need_w:
                if compute_dtype == acc_dtype:
                    grad_w.addmm_(d_logits.t(), h)
                else:
                    grad_w += (d_logits.t() @ h).to(acc_dtype)
            del d_logits  # free before the next chunk allocates its own
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _dtypes(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    # Matmul in the inputs' dtype (like the model's own lm_head), softmax in >= fp32.
    compute = torch.promote_types(hidden.dtype, weight.dtype)
    return compute, torch.promote_types(compute, torch.float32)


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, compute_dtype, acc_dtype) -> Tensor:
    """A fresh [chunk, V] buffer in acc_dtype that callers may modify in place."""
    logits = F.linear(h.to(compute_dtype), w, b)
    return logits if logits.dtype == acc_dtype else logits.to(acc_dtype)


def token_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    chunk_tokens: int = 1024,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """log softmax(hidden @ W^T + b)[targets], shape targets.shape.

    hidden [..., H], lm_head_weight [V, H], targets [...] (valid token ids). The result
    is float32 (float64 for float64 inputs). Peak extra memory is O(chunk_tokens * V)
    in forward and backward; gradients flow to hidden, weight and bias.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    out = _ChunkedTokenLogprobs.apply(flat_hidden, lm_head_weight, lm_head_bias, flat_targets, chunk_tokens)
    return out.view(targets.shape)


# Config fields of HF models whose logits are not a plain `lm_head(hidden)`.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


class LogprobHead(torch.nn.Module):
    """The output embedding as a module whose forward is `token_logprobs`. It registers
    the LM head's own Parameters (shared, not copied), so ZeRO-3's module hooks gather
    them before this forward and again before its backward, as for any layer."""

    def __init__(self, lm_head: torch.nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.weight = lm_head.weight
        self.bias = getattr(lm_head, "bias", None)
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: Tensor, targets: Tensor) -> Tensor:
        return token_logprobs(hidden, self.weight, targets, self.chunk_tokens, self.bias)


def check_plain_head(config) -> None:
    for field, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, field, neutral)
        if value is not None and value != neutral:
            raise NotImplementedError(f"{field}={value}: logits are not a plain linear head")


def causal_lm_token_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    chunk_tokens: int = 1024,
    position_ids: Tensor | None = None,
    score_mask: Tensor | None = None,
) -> Tensor:
    """Log-prob of each next token under an HF causal LM: [B, T-1], entry t scores
    input_ids[:, t+1] (0 where `score_mask` [B, T-1] is given and false).

    Runs only the decoder body and feeds its last hidden state to `token_logprobs`
    with the output embedding's weight (the same Parameter as the input embedding
    when tied, so both uses accumulate into one gradient). For packed sequences pass
    position_ids; positions whose target starts a new sequence are meaningless and
    must be masked out by the caller (they are prompt tokens anyway).
    """
    return TokenLogprobModel(model, chunk_tokens)(input_ids, attention_mask, position_ids, score_mask)


class TokenLogprobModel(torch.nn.Module):
    """An HF causal LM whose forward returns per-token target log-probs [B, T-1]: the
    module the train loop hands to DeepSpeed, so the engine's forward is the objective's
    input. Works under ZeRO-1/2/3 (see LogprobHead)."""

    def __init__(self, model, chunk_tokens: int = 1024):
        super().__init__()
        check_plain_head(model.config)
        self.model = model
        self.head = LogprobHead(model.get_output_embeddings(), chunk_tokens)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, score_mask: Tensor | None = None) -> Tensor:
        """[B, T-1] log-probs; with `score_mask` only those positions (the response tokens)
        go through the vocabulary and the rest are 0: the head costs about as much per
        token as several decoder layers (4x its matmul here: forward, recompute, two
        gradients), and prompt positions need no log-probs."""
        body = self.model.get_decoder()
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden, targets = out.last_hidden_state[:, :-1], input_ids[:, 1:]
        if score_mask is None:
            return self.head(hidden, targets)
        keep = score_mask.bool()
        scored = self.head(hidden[keep], targets[keep])
        return scored.new_zeros(targets.shape).masked_scatter(keep, scored)
