"""Brute-force CTC oracles for tiny inputs: enumerate every frame labelling or state path."""
from __future__ import annotations

import itertools
import math

import torch


def collapse(path, blank=0):
    out, prev = [], None
    for k in path:
        if k != prev and k != blank:
            out.append(k)
        prev = k
    return out


def alignments(T: int, C: int, target, blank=0):
    """Every frame labelling of length T that collapses to ``target`` (standard CTC)."""
    target = list(target)
    return [p for p in itertools.product(range(C), repeat=T) if collapse(p, blank) == target]


def brute_force_nll(log_probs: torch.Tensor, target, blank=0) -> float:
    """-log sum over alignments of prod_t y_t(pi_t); log_probs (T, C)."""
    T, C = log_probs.shape
    lp = log_probs.double().tolist()
    scores = [sum(lp[t][k] for t, k in enumerate(p)) for p in alignments(T, C, target, blank)]
    if not scores:
        return math.inf
    m = max(scores)
    return -(m + math.log(sum(math.exp(s - m) for s in scores)))


def brute_force_posteriors(log_probs: torch.Tensor, target, blank=0) -> torch.Tensor:
    """(T, C) posterior probability that frame t carries class k, over all alignments."""
    T, C = log_probs.shape
    paths = alignments(T, C, target, blank)
    lp = log_probs.double()
    post = torch.zeros(T, C, dtype=torch.float64)
    if not paths:
        return post
    scores = torch.tensor([float(sum(lp[t, k] for t, k in enumerate(p))) for p in paths], dtype=torch.float64)
    w = torch.softmax(scores, 0)
    for p, wi in zip(paths, w):
        for t, k in enumerate(p):
            post[t, k] += wi
    return post


def state_paths(T: int, target, topology="standard"):
    """Every sequence of extended-target states of length T allowed by the topology, written
    from the transition rules directly (not from ctclab's trellis)."""
    ext = [None]
    for k in target:
        ext += [k, None]
    S = len(ext)
    finals = {S - 1, S - 2} if target else {0}

    # the topologies' rules, from their papers (not from ctclab's graph): label self-loops are
    # dropped by selfless and minimal CTC; modified and minimal CTC let equal labels follow
    # each other directly
    label_stay = topology in ("standard", "modified")
    equal_skip = topology in ("modified", "minimal")

    def allowed(a, b):
        if b == a:
            return ext[a] is None or label_stay
        if b == a + 1:
            return True
        if b == a + 2 and ext[b] is not None:
            return equal_skip or ext[b] != ext[a]
        return False

    out = []
    for seq in itertools.product(range(S), repeat=T):
        if seq[0] not in (0, 1) or seq[-1] not in finals or (seq[0] == 1 and not target):
            continue
        if all(allowed(a, b) for a, b in zip(seq, seq[1:])):
            out.append(seq)
    return out, ext


def brute_force_topology_nll(log_probs, target, blank=0, topology="standard") -> float:
    T = log_probs.shape[0]
    seqs, ext = state_paths(T, target, topology)
    lp = log_probs.double().tolist()
    scores = [sum(lp[t][blank if ext[s] is None else ext[s]] for t, s in enumerate(seq)) for seq in seqs]
    if not scores:
        return math.inf
    m = max(scores)
    return -(m + math.log(sum(math.exp(s - m) for s in scores)))


def scored_paths(log_probs, target, blank=0, topology="standard", entry_weight=None):
    """The topology's state paths of ``log_probs`` ``(T, C)``, their scores (emissions plus
    ``entry_weight(t)`` for every entry into a label state at frame t, t = 0 included) and the
    extended target (None for blank)."""
    T = log_probs.shape[0]
    seqs, ext = state_paths(T, target, topology)
    lp = log_probs.double().tolist()
    scores = []
    for seq in seqs:
        score = sum(lp[t][blank if ext[s] is None else ext[s]] for t, s in enumerate(seq))
        if entry_weight is not None:
            score += sum(entry_weight(t) for t, s in enumerate(seq) if ext[s] is not None and (t == 0 or seq[t - 1] != s))
        scores.append(score)
    return seqs, scores, ext


def brute_force_weighted_paths(log_probs, target, blank=0, topology="standard", entry_weight=None):
    """(nll, path entropy) over the topology's state paths (:func:`scored_paths`)."""
    _, scores, _ = scored_paths(log_probs, target, blank, topology, entry_weight)
    if not scores:
        return math.inf, 0.0
    m = max(scores)
    z = sum(math.exp(s - m) for s in scores)
    probs = [math.exp(s - m) / z for s in scores]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return -(m + math.log(z)), entropy


def brute_force_paths(log_probs, target, blank=0, topology="standard", entry_weight=None):
    """Everything the conformance suite checks, by enumerating the topology's state paths of
    one item (``log_probs`` ``(T, C)``): ``(nll, state posteriors (T, S), best path score, best
    state path)``; each path scored by its emissions plus ``entry_weight(t)`` for every entry
    into a label state at frame t (t = 0 included). ``nll`` is inf and the best path None when
    no path exists."""
    T = log_probs.shape[0]
    seqs, scores, ext = scored_paths(log_probs, target, blank, topology, entry_weight)
    S = len(ext)
    post = torch.zeros(T, S, dtype=torch.float64)
    finite = [s for s in scores if s > -math.inf]
    if not finite:
        return math.inf, post, -math.inf, None
    m = max(finite)
    z = sum(math.exp(s - m) for s in finite)
    for seq, score in zip(seqs, scores):
        for t, s in enumerate(seq):
            post[t, s] += math.exp(score - m) / z
    best = max(range(len(seqs)), key=lambda i: scores[i])
    return -(m + math.log(z)), post, scores[best], list(seqs[best])
