"""Fused cross-entropy: on logits, and on (hidden, lm_weight) without the logits.

The math (one token i, logits z over a vocabulary of V, after the optional
soft cap z = c * tanh(x / c)):

    lse   = log sum_v exp(z_v)
    q     = (1 - eps) * w + eps * S / V        target distribution; w_k on the
                                               slot ids id_k, S = sum_k w_k
    loss  = -sum_v q_v log p_v + zl * lse^2
          = S * lse - (1 - eps) * sum_k w_k z_{id_k} - eps * S * mean(z) + zl * lse^2

A hard target is the soft target with one slot of weight 1, so one formula
covers both. The loss of a token is then multiplied by its token_weight. Tokens
whose every slot is ignore_index are not counted: loss 0, gradient 0.

Gradient of the loss of token i with respect to its logits, with r the
upstream scale of that token (grad_out * token_weight / denominator):

    dL/dz_v = r * [ p_v * (S + 2 * zl * lse) - (1 - eps) * sum_k w_k [v = id_k] - eps * S / V ]
    dL/dx_v = dL/dz_v * (1 - (z_v / c)^2)            with a soft cap

and for the linear form, with G the (N, V) matrix of dL/dx:
dhidden = G @ lm_weight, dlm_weight = G^T @ hidden, dbias = G.sum(0).

Reductions: "none" (per token), "sum", and "mean" = sum / denominator, where the
denominator is `num_tokens` when given (so micro-batches of one optimizer step
each divide by the step's total count and their gradients add up exactly), else
the number of counted tokens of this call. If no token is counted, "mean" is 0
and every gradient is zero (the denominator is clamped to at least 1), never NaN.

Implementations (`impl=`, the vocabulary of docs/ops.md):
  "triton"      Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
                Linear form: the forward streams over V tiles of hidden @ lm_weight^T with
                an online logsumexp; the backward recomputes each (rows x vocab) tile and
                accumulates dhidden and dlm_weight with atomics. Logits never exist.
  "torch_fast"  the chunked torch path (chunked.py): chunks of rows, never the full
                logits; any device. Deprecated spellings: "cpu", "chunked".
  "torch"       the pure-PyTorch reference (materializes the logits): the oracle.
  "auto"        "triton" on CUDA tensors, "torch_fast" elsewhere.

Invalid values, the same for every impl: on CPU tensors an out-of-range target id, a
negative target weight, a negative token_weight or a tensor num_tokens <= 0 raises
ValueError. On CUDA tensors checking would need a host synchronization, so instead such a
token's loss (for num_tokens: every loss), hence the reduced loss and the gradients, is NaN:
never a silently wrong number.

Gradients: every impl differentiates hidden, lm_weight, bias (or the logits), and also the
target weights and token_weight when they require grad (the fast paths from the row terms of
their forward: dL/dtoken_weight_i = s_i * loss_i before weighting, dL/dw_k = s_i *
token_weight_i * (lse - (1 - eps) z_{id_k} - eps * mean(z)), s_i the reduction's scale).
Second-order gradients (backward with create_graph=True) are supported by impl="torch" only;
the fast paths raise NotImplementedError there rather than return a silent 0.

linear_log_probs (log_probs.py): per-token log-probabilities, entropy and the other
statistics TRL's fused LM head asks for, on the same kernels.

Layout: reference.py (the oracle), validation.py, rows.py (options, row terms, the
gradient's coefficients), chunked.py, triton_launch.py, registration.py (custom ops and
autograd), api.py (the public functions and modules).
"""
from gapfix.ops.cross_entropy.api import (
    CrossEntropyLoss,
    LinearCrossEntropyLoss,
    cross_entropy,
    linear_cross_entropy,
)
from gapfix.ops.cross_entropy.log_probs import (
    TokenLogProbs,
    linear_log_probs,
    linear_log_probs_reference,
)
from gapfix.ops.cross_entropy.reference import cross_entropy_reference, linear_cross_entropy_reference

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "cross_entropy_reference",
    "linear_cross_entropy_reference",
    "linear_log_probs",
    "linear_log_probs_reference",
    "TokenLogProbs",
]
