"""Softmax and log-sum-exp from one pass of exponentials over the scores (p = exp(scores - lse)).

LaMemo needs both for every attention row (the probabilities weight the values, the log-sum-exp is the
normaliser Z cached with the memory and, for the look-ahead rows, Z+ that the interpolation differentiates).
``torch.logsumexp`` followed by a softmax exponentiates every score twice (and logsumexp alone makes several
passes). Here the fused softmax kernel runs once and the log-sum-exp is read off its result: the largest
probability of a row is exp(max - lse), so lse = max(scores) - log(max(p)) -- two cheap reductions, and exact
to float32 rounding since max(p) >= 1 / (number of keys). The backward keeps only the probabilities:
d scores = p * (g_p - sum(g_p * p) + g_lse). With ``grad_in_place`` it writes d scores into g_p's buffer
(the same kernel, so the same bits): one [.., rows, keys] tensor less at the attention's backward peak.
"""
from __future__ import annotations

import torch


def statistics_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """Z-bar / Z+ and the interpolation run in float32 whatever the activations (bf16, fp16), or in
    float64 for a float64 model (so that float64 checks stay float64)."""
    return torch.promote_types(activation_dtype, torch.float32)


class _SoftmaxWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, grad_in_place: bool):
        ctx.set_materialize_grads(False)
        ctx.grad_in_place = grad_in_place
        stat = statistics_dtype(scores.dtype)
        # float32 probabilities (and statistics) whatever the scores' dtype; no copy when already float32
        probs = torch.softmax(scores, dim=-1, dtype=stat)
        lse = scores.amax(dim=-1).to(stat) - probs.amax(dim=-1).log()
        if probs.dtype != scores.dtype:
            probs = probs.to(scores.dtype)
        ctx.save_for_backward(probs)
        return probs, lse

    @staticmethod
    def backward(ctx, grad_probs, grad_lse):
        (probs,) = ctx.saved_tensors
        if grad_probs is None:
            grad = torch.zeros_like(probs)
        elif ctx.grad_in_place and grad_probs.is_contiguous() and grad_probs.dtype == probs.dtype:
            # Row by row the kernel reads a row of g_p and p, then writes the row: an output aliasing g_p is exact.
            grad = torch.ops.aten._softmax_backward_data.out(grad_probs, probs, -1, probs.dtype,
                                                              grad_input=grad_probs)
        else:
            grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        if grad_lse is not None:
            grad = grad.addcmul_(probs, grad_lse.unsqueeze(-1).to(probs.dtype))
        return grad, None


def softmax_with_lse(scores: torch.Tensor, *, grad_in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(scores, -1) in the scores' dtype, logsumexp(scores, -1) in float32 at least), one pass.
    Every row must allow at least one key (a row of -inf has no normaliser).

    ``grad_in_place``: the backward overwrites the probabilities' incoming gradient with the scores' gradient.
    Only for a caller whose probabilities reach the loss through one op that makes a fresh gradient (the
    attention's ``probs @ v``, after dropout or not): that gradient is then read by nothing else. Not with
    hooks or ``retain_grad`` on the probabilities."""
    return _SoftmaxWithLSE.apply(scores, grad_in_place)
