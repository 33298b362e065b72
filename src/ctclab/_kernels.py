"""CPU kernels (numba) for the fused CTC forward-backward, parallel over the batch.

Probability space with per-frame rescaling (Graves et al. 2006, section 4.1, eq. 9): no exp or
log inside the state loop, which is what makes it fast. Each frame's emissions are divided by
their maximum over the item's labels (one exp per distinct label, float64); forward and backward
variables are renormalised to sum to 1 at every frame, and the posteriors come out normalised
per frame. Only states on the band that can both be reached from the start and still reach the
end are visited; the others have zero posterior.

Exactness guard: a state or emission whose score underflows to 0 although it should not flags
the item; the caller recomputes flagged items in log space (:mod:`ctclab.trellis`). So results
are those of the log-space recursion, however extreme the scores.

The state graph (labels, skip transitions) comes from :class:`ctclab.trellis.CTCTrellis`;
these kernels only run its recursion.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# reassociation lets LLVM vectorise the per-frame sums; no flag that assumes finite values
_jit = numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})


@numba.njit(inline="always")
def _band(t, Tb, Sb):
    """States ``[lo, hi)`` that are reachable at frame t and can still reach the end."""
    return max(0, Sb - 2 * (Tb - t)), min(Sb, 2 * t + 2)


@_jit
def forward(log_probs, classes, num_classes, skip, state_class, num_states, input_lengths, scaled, alpha):
    """Forward pass.

    Args:
        log_probs: ``(T, B, C)`` float32/float64 log-scores.
        classes: ``(B, U)`` int64, the distinct labels of each item (blank included);
            num_classes: ``(B,)`` how many.
        skip: ``(B, S + 2)`` float64, 1 where the skip transition into a state is allowed
            (two trailing zeros for states past the end).
        state_class: ``(B, S)`` int64, column of each state's label in ``classes``.
        num_states: ``(B,)`` 2L+1; input_lengths: ``(B,)``.
        scaled: ``(B, T, U)`` float64 out, ``exp(log_prob - frame max)`` of each distinct label.
        alpha: ``(B, T, S)`` out, forward variables up to a per-frame scale (band only).

    Returns:
        ``(B,)`` float64 log-likelihood (-inf if no path), ``(B,)`` bool underflow flags.
    """
    B, T, S = alpha.shape
    loglik = np.full(B, -np.inf)
    flagged = np.zeros(B, dtype=np.bool_)
    for b in numba.prange(B):
        Sb = num_states[b]
        Tb = input_lengths[b]
        prev = np.zeros(Sb + 2)  # two leading zeros stand for states -2 and -1
        cur = np.zeros(Sb + 2)
        total = 0.0
        inv_prev = 1.0
        ok = Tb > 0
        for t in range(Tb):
            frame_max = -np.inf
            for u in range(num_classes[b]):
                frame_max = max(frame_max, np.float64(log_probs[t, b, classes[b, u]]))
            if frame_max == -np.inf:  # every label impossible at this frame
                ok = False
                break
            for u in range(num_classes[b]):
                score = np.float64(log_probs[t, b, classes[b, u]])
                e = math.exp(score - frame_max)
                flagged[b] |= (e == 0.0) & (score != -np.inf)
                scaled[b, t, u] = e
            lo, hi = _band(t, Tb, Sb)
            # cur = alpha_t / (exp(shifts) * previous frame's sum): a per-frame scale, which the
            # posteriors (normalised per frame) do not see and the likelihood adds back in logs
            norm = 0.0
            underflow = False
            for s in range(lo, hi):
                inflow = 1.0 if t == 0 else prev[s + 2] + prev[s + 1] + skip[b, s] * prev[s]
                y = scaled[b, t, state_class[b, s]] * inv_prev
                v = inflow * y
                underflow |= (v == 0.0) & (inflow > 0.0) & (y > 0.0)
                cur[s + 2] = v
                alpha[b, t, s] = v
                norm += v
            if norm == 0.0:
                ok = False
                break
            flagged[b] |= underflow
            cur[lo : lo + 2] = 0.0  # states lo-2, lo-1: read next frame, stale from two frames ago
            inv_prev = 1.0 / norm
            total += math.log(norm) + frame_max
            prev, cur = cur, prev
        if ok:
            end = prev[Sb + 1] + (prev[Sb] if Sb > 1 else 0.0)
            loglik[b] = total + math.log(end * inv_prev)
    return loglik, flagged


@_jit
def backward(classes, num_classes, skip, state_class, num_states, input_lengths, alpha, scaled, grad_scale, grad):
    """Backward pass: ``grad[t, b, k] -= grad_scale[b] * gamma_t(k)`` for every item with a
    non-zero ``grad_scale``. Returns ``(B,)`` bool flags (underflow: recompute in log space)."""
    B, T, S = alpha.shape
    flagged = np.zeros(B, dtype=np.bool_)
    for b in numba.prange(B):
        g = grad_scale[b]
        Sb = num_states[b]
        Tb = input_lengths[b]
        if g == 0.0 or Tb == 0:
            continue
        beta = np.zeros(Sb + 2)  # two trailing zeros stand for states Sb and Sb+1
        weighted = np.zeros(Sb + 2)  # below the band: never written, so zero
        occupancy = np.zeros(num_classes[b])
        beta[Sb - 1] = 1.0
        if Sb > 1:
            beta[Sb - 2] = 1.0
        for t in range(Tb - 1, -1, -1):
            lo, hi = _band(t, Tb, Sb)
            z = 0.0
            norm = 0.0
            underflow = False
            for s in range(lo, hi):
                u = state_class[b, s]
                ab = alpha[b, t, s] * beta[s]
                occupancy[u] += ab
                z += ab
                norm += beta[s]
                y = scaled[b, t, u]
                w = beta[s] * y
                weighted[s] = w
                underflow |= (w == 0.0) & (beta[s] > 0.0) & (y > 0.0)
            flagged[b] |= underflow
            if z == 0.0:
                flagged[b] = True
                break
            scale = g / z
            for u in range(num_classes[b]):
                grad[t, b, classes[b, u]] -= scale * occupancy[u]
                occupancy[u] = 0.0
            if t == 0:
                break
            # beta_{t-1}(s) = sum over successors s' of beta_t(s') y_t(s'), rescaled by 1/sum(beta_t)
            inv = 1.0 / norm
            plo, phi = _band(t - 1, Tb, Sb)
            for s in range(plo, phi):
                beta[s] = (weighted[s] + weighted[s + 1] + skip[b, s + 2] * weighted[s + 2]) * inv
    return flagged
