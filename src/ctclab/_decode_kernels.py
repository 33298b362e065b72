"""CPU kernels (numba) of :mod:`ctclab.decode`: best-path decoding (:func:`collapse_runs`), the
prefix beam search, and the exact CTC score of its results (:func:`ctc_log_likelihoods`).

:func:`run` loops over frames for a whole batch: every prefix in a beam stays (blank, or its
last token again) or grows by one token, equal prefixes merge (:func:`_expand`), then each beam
keeps its best prefixes by acoustic + LM score (:func:`_prune`). This is the classic prefix beam
search (Hannun et al. 2014, "First-Pass Large Vocabulary Continuous Speech Recognition using
Bi-Directional Recurrent DNNs", arXiv 1408.2873, algorithm 1): a beam entry is ``(prefix,
log P(paths ending in blank), log P(paths ending in its last token))``; blank is always tried,
tokens where their log-prob reaches ``token_min_logp``.

The word LM stays in Python, behind :class:`ctclab.lm.LanguageModel`: a completed word is looked
up in a cache keyed by ``(LM state id, word)``; pairs not seen yet are listed and :func:`run`
returns (:data:`NEED_LM`) so the decoder can score them, then resumes at the same frame. It also
returns (:data:`NEED_SPACE`) when a table could overflow during the next frame; the decoder
enlarges it. Both get rare as the tables warm up: most frames run without leaving the kernel.

Tables (int64/float64 arrays; hash maps are open addressing with linear probing, key -1 = empty):

- prefix arena ``(B * frames, 6)`` ints ``parent, token, word node, LM state, characters of
  the word being spelled, hotword state`` and ``(., 3)`` floats ``LM score of its completed
  words and hotword bonuses won, sure static score, hotword lookahead`` (sure static = that
  LM score + the partial word's ``unk_offset``; lookahead: see below). Only prefixes that
  enter a beam are stored.
- word trie over unicode code points: ``(nodes, 4)`` ``parent, code point, flags, depth``
  (node 0 = empty word) and its child map ``node * 2^21 + code point -> node``. The LM's
  vocabulary is inserted up front with flags; other spellings get flagless nodes when the
  search meets them, so a node id is a word.
- hotwords: an Aho-Corasick automaton (built by :mod:`ctclab.decode`) over the prefix's text
  as a stream of code points with :data:`SEPARATOR` before every word and after the last
  one; a hotword (one word or a phrase) is the pattern ``SEP w1 SEP w2 ... SEP``, so it
  matches whole words only, and every occurrence is found, overlapping ones too. Tables:
  ``hot_map`` (``state * 2^21 + code point -> child``), ``hot_fail`` (failure links),
  ``hot_gain`` (the bonus won on entering a state: every pattern that ends there) and
  ``hot_look`` (the lookahead of a state: the share of a pattern's bonus it has spelled so
  far). The bonus counts only once a pattern is complete; the lookahead is a search
  heuristic, taken back as soon as the text leaves the pattern, and never part of a
  hypothesis's score.
- LM cache: map ``state << 32 | node -> slot`` (slot -1: asked, not answered), ``cache_score``
  (``alpha * log P + beta``), ``cache_state`` (state id after the word), ``pending`` keys.

Pruning (:func:`_prune`): a beam is the ``width`` best candidates by ``acoustic + sure
static`` within ``beam_prune_logp`` of the best of them (what it is without hotwords), plus up
to ``extra`` candidates inside a hotword, by ``acoustic + sure static + lookahead``, that reach
the same floor: a lookahead keeps its own prefix in sight and never pushes another one out.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .backends.numba_kernels import NRT_OPTION

_jit = numba.njit(cache=True, nogil=True)
# helpers that allocate nothing: without NRT, the arrays they are handed cost no reference
# counting (atomic increments and decrements per call were most of the search's time; see
# ctclab.backends.numba_kernels)
_helper = numba.njit(cache=True, nogil=True, _nrt=False) if NRT_OPTION else _jit

#: word-trie node flags
LM_PREFIX, LM_WORD = 1, 8
#: the node that stands for every word outside the LM's vocabulary (an LM that lists its
#: vocabulary scores all of them as its unknown word)
UNKNOWN_WORD = (1 << 32) - 1
#: token kinds
PLAIN, DELIMITER, WORD_START, BLANK = 0, 1, 2, 3
#: decoder parameters, in this order, in one float64 array
TOKEN_MIN_LOGP, BEAM_PRUNE_LOGP, UNK_OFFSET, HAS_HOTWORDS, HAS_LM, HAS_VOCABULARY, SPELL_WORDS, LONGEST_TOKEN, COMPLETING, MIN_KEEP = range(10)
#: the node of every spelling the trie does not hold, when spellings need no identity of their
#: own (no LM, or an LM that lists its vocabulary: it scores all other words alike)
OTHER_WORD = 1
#: counters in ``sizes``
TRIE_NODES, TRIE_KEYS, CACHE_KEYS, CACHE_SLOTS, PENDING, ARENA = range(6)
#: what :func:`run` returns for
DONE, NEED_LM, NEED_SPACE = 0, 1, 2

EMPTY = -1
NO_PARENT = -1
#: log of a term that cannot change ``1 + term`` in float64 (e^-38 < 2^-54, half an ulp of 1,
#: even two of them)
_NEGLIGIBLE = -38.0
CHARS = 1 << 21  # above any unicode code point
#: the code point that stands for a word boundary in the hotword automaton's stream (no
#: unicode character has it, so no spelled word contains it)
SEPARATOR = CHARS - 1
_GOLDEN = -7046029254386353131  # 2^64 / golden ratio, as int64 (Fibonacci hashing)


@_helper
def _slot(table, key):
    """Where ``key`` is in the map ``table`` ``(capacity, 2)``, or the empty slot it would take."""
    mask = table.shape[0] - 1
    x = key * _GOLDEN
    h = (x ^ (x >> 29)) & mask
    while table[h, 0] != EMPTY and table[h, 0] != key:
        h = (h + 1) & mask
    return h


@numba.njit(cache=True, nogil=True, parallel=True)
def first_index_of(log_probs, maxima, labels):
    """``labels[t, b]`` = first class whose log-prob is ``maxima[t, b]`` (the row's maximum, from
    a vectorised reduction; this scan stops there). -1 where the row holds NaN."""
    T, B, C = log_probs.shape
    for i in numba.prange(T * B):
        t, b = i // B, i % B
        k = 0
        while k < C and log_probs[t, b, k] != maxima[t, b]:
            k += 1
        labels[t, b] = k if k < C else -1


@numba.njit(cache=True, nogil=True, parallel=True)
def collapse_runs(labels, scores, lengths, blank, tokens, starts, ends, mean_probs, counts):
    """Best-path decoding's collapse, parallel over the batch: runs of the same best class
    become one token, blanks drop out.

    Args:
        labels/scores: ``(T, B)`` best class of each frame and its log-prob; lengths: ``(B,)``.
        tokens/starts/ends: ``(B, T)`` int64 out, token, first frame and end frame (exclusive)
            of each run of a non-blank class; mean_probs: ``(B, T)`` float64 out, the mean
            probability of the token over its run; counts: ``(B,)`` out, runs per item.
    """
    for b in numba.prange(labels.shape[1]):
        n, previous, total = 0, blank, 0.0
        for t in range(lengths[b]):
            best = labels[t, b]
            if best != previous and previous != blank:  # the run of the previous token ends
                mean_probs[b, n - 1] = total / (t - starts[b, n - 1])
                ends[b, n - 1] = t
            if best != previous and best != blank:
                tokens[b, n], starts[b, n] = best, t
                n += 1
                total = 0.0
            total += math.exp(scores[t, b])
            previous = best
        if previous != blank:
            mean_probs[b, n - 1] = total / (lengths[b] - starts[b, n - 1])
            ends[b, n - 1] = lengths[b]
        counts[b] = n


@_jit
def rehash(old, new):
    """Move every entry of map ``old`` into the empty map ``new``."""
    for i in range(old.shape[0]):
        if old[i, 0] != EMPTY:
            h = _slot(new, old[i, 0])
            new[h, 0], new[h, 1] = old[i, 0], old[i, 1]


@_helper
def _logaddexp(a, b):
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


@_helper
def _child(trie, trie_map, sizes, params, node, code):
    key = node * CHARS + code
    h = _slot(trie_map, key)
    if trie_map[h, 0] == key:
        return trie_map[h, 1]
    if node == OTHER_WORD or not params[SPELL_WORDS]:
        return OTHER_WORD
    child = sizes[TRIE_NODES]
    sizes[TRIE_NODES] += 1
    sizes[TRIE_KEYS] += 1
    trie[child, 0], trie[child, 1], trie[child, 2], trie[child, 3] = node, code, 0, trie[node, 3] + 1
    trie_map[h, 0], trie_map[h, 1] = key, child
    return child


@_jit
def insert_word(tables, codes, prefix_flag, word_flag, params):
    """Insert a word (code points) into the trie, or-ing ``prefix_flag`` into every node on its
    path and ``word_flag`` into its last node. The caller has made room."""
    trie, trie_map, sizes = tables[0], tables[1], tables[6]
    node = 0
    for code in codes:
        node = _child(trie, trie_map, sizes, params, node, code)
        trie[node, 2] |= prefix_flag
    trie[node, 2] |= word_flag


@_helper
def _spell(trie, node, out):
    for i in range(trie[node, 3] - 1, -1, -1):
        out[i] = trie[node, 1]
        node = trie[node, 0]


@_helper
def _partial_score(trie, node, chars, params):
    """Score of a word being spelled (``chars`` code points so far): ``unk_offset`` when no LM
    word starts so (times ``chars / 6`` past 6 characters, as pyctcdecode does, so that a long
    unknown spelling does not cost less than the unknown word it will become)."""
    if node == 0 or params[HAS_VOCABULARY] == 0.0 or trie[node, 2] & LM_PREFIX:
        return 0.0
    return params[UNK_OFFSET] * max(1.0, chars / 6.0)


@_helper
def _hot_step(hot_map, hot_fail, state, code):
    """The hotword automaton's state after ``code`` (Aho-Corasick: the longest suffix of the
    stream that begins some pattern; 0 = none)."""
    while True:
        key = state * CHARS + code
        h = _slot(hot_map, key)
        if hot_map[h, 0] == key:
            return hot_map[h, 1]
        if state == 0:
            return 0
        state = hot_fail[state]


@_jit
def fill_map(table, keys, values):
    """Put ``keys -> values`` into the empty map ``table`` (room made by the caller)."""
    for i in range(len(keys)):
        h = _slot(table, keys[i])
        table[h, 0], table[h, 1] = keys[i], values[i]


@_helper
def _complete(trie, cache_map, cache_score, cache_state, pending, sizes, params, node, state, lm):
    """``(state, lm, pending key)`` after the word at ``node`` completes; with a pending key
    (>= 0) the LM's part is still to come from the cache. (Arrays one by one, not as the
    tables tuple: taking arrays out of a tuple costs atomic reference counting, per call.)"""
    if node == 0 or params[HAS_LM] == 0.0:
        return state, lm, -1
    if params[HAS_VOCABULARY] != 0.0 and not trie[node, 2] & LM_WORD:
        node = UNKNOWN_WORD
    key = (state << 32) | node
    h = _slot(cache_map, key)
    if cache_map[h, 0] == key:
        slot = cache_map[h, 1]
        if slot >= 0:
            return cache_state[slot], lm + cache_score[slot], -1
        return state, lm, key
    cache_map[h, 0], cache_map[h, 1] = key, -1
    sizes[CACHE_KEYS] += 1
    pending[sizes[PENDING]] = key
    sizes[PENDING] += 1
    return state, lm, key


@_helper
def _expand(t, b, log_probs, blank, params, tokens, arena, tables, hot, beams, candidates, table, chosen):
    """Frame ``t`` of utterance ``b``: candidates for the next beam, merged by prefix
    (a per-frame map ``(parent, token) -> candidate``; a prefix is its parent and last token)."""
    arena_ints, arena_floats = arena[0], arena[1]
    kind, codes, offsets = tokens
    trie, trie_map, cache_map, cache_score, cache_state, pending, sizes = tables
    hot_map, hot_fail, hot_gain, hot_look = hot
    hotwords = params[HAS_HOTWORDS] != 0.0
    beam_prefix, beam_p, beam_size = beams
    ints, floats, count = candidates
    C = log_probs.shape[2]
    row = log_probs[t, b]
    n_chosen, best = 0, -1
    for k in range(C):
        if k == blank:
            continue
        if row[k] >= params[TOKEN_MIN_LOGP]:
            chosen[n_chosen] = k
            n_chosen += 1
        if best < 0 or row[k] > row[best]:
            best = k
    if n_chosen == 0 and best >= 0:  # an utterance never stalls for want of a token
        chosen[0] = best
        n_chosen = 1
    # the map of this frame: rows stamped with an older frame's number count as empty
    stamp = table[0, 2] + 1
    table[0, 2] = stamp
    mask = 16 - 1
    while mask + 1 < 2 * beam_size[b] * (1 + n_chosen):
        mask = 2 * mask + 1
    n = 0
    # every beam prefix first, so that a child equal to one of them merges into it
    for grow in range(2):
        for i in range(beam_size[b]):
            p = beam_prefix[b, i]
            p_blank, p_label = beam_p[b, i, 0], beam_p[b, i, 1]
            total = _logaddexp(p_blank, p_label)
            last = arena_ints[p, 1]
            for j in range(n_chosen if grow else 1):
                parent, k = (p, chosen[j]) if grow else (arena_ints[p, 0], last)
                key = (parent + 1) * (C + 1) + k + 1
                x = key * _GOLDEN
                h = 1 + ((x ^ (x >> 29)) & mask)  # row 0 holds the frame number
                while table[h, 2] == stamp and table[h, 0] != key:
                    h = 1 + (h & mask)
                if table[h, 2] == stamp:
                    s = table[h, 1]
                else:
                    table[h, 0], table[h, 1], table[h, 2] = key, n, stamp
                    s = n
                    n += 1
                    floats[b, s, 0] = floats[b, s, 1] = -np.inf
                    ints[b, s, 0], ints[b, s, 1], ints[b, s, 2] = parent, k, -1 if grow else p
                    if grow:  # what the new prefix knows of its words
                        node, state, chars, lm, pending_key = arena_ints[p, 2], arena_ints[p, 3], arena_ints[p, 4], arena_floats[p, 0], -1
                        hot_state = arena_ints[p, 5]
                        if kind[k] == DELIMITER or kind[k] == WORD_START:
                            if hotwords and node != 0:  # a word ends: hotwords that end with it count
                                hot_state = _hot_step(hot_map, hot_fail, hot_state, SEPARATOR)
                                lm += hot_gain[hot_state]
                            state, lm, pending_key = _complete(trie, cache_map, cache_score, cache_state, pending, sizes, params, node, state, lm)
                            node = chars = 0
                        if kind[k] != DELIMITER:
                            for c in range(offsets[k], offsets[k + 1]):
                                node = _child(trie, trie_map, sizes, params, node, codes[c])
                                if hotwords:
                                    hot_state = _hot_step(hot_map, hot_fail, hot_state, codes[c])
                            chars += offsets[k + 1] - offsets[k]
                        ints[b, s, 3], ints[b, s, 4], ints[b, s, 5], ints[b, s, 6], floats[b, s, 2] = node, state, pending_key, chars, lm
                        ints[b, s, 7], floats[b, s, 3] = hot_state, hot_look[hot_state]
                if not grow:  # stay: a blank, or the last token once more
                    floats[b, s, 0] = _logaddexp(floats[b, s, 0], total + row[blank])
                    if last >= 0:
                        floats[b, s, 1] = _logaddexp(floats[b, s, 1], p_label + row[last])
                elif k == last:  # the same token again is a new one only after a blank
                    floats[b, s, 1] = _logaddexp(floats[b, s, 1], p_blank + row[k])
                else:
                    floats[b, s, 1] = _logaddexp(floats[b, s, 1], total + row[k])
    count[b] = n


@_jit
def _sort_by(order, m, score):
    """``order[:m]`` sorted by ``score``, best first (stable: ties keep their order)."""
    if m <= 16:
        for i in range(1, m):
            s, j = order[i], i
            while j > 0 and score[order[j - 1]] < score[s]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = s
    else:
        order[:m] = order[:m][np.argsort(-score[order[:m]], kind="mergesort")]


@_jit
def _prune(b, width, extra, params, arena, tables, beams, candidates, scratch, order_scratch):
    """The next beam of utterance ``b`` from its candidates (ties: order of appearance):

    - the best ``width`` by score (acoustic + static: LM and hotword bonuses won, partial-word
      ``unk_offset``) of those within ``beam_prune_logp`` of the best; at least ``min_keep``
      of them (``nbest``) when that many have a finite score. This is the beam that the search
      keeps without hotwords: lookaheads change nothing in it.
    - then up to ``extra`` more that are spelling a hotword, by score + lookahead, among those
      whose score + lookahead reaches that same floor: a hotword that the acoustics rate low
      stays in sight until it completes (and wins its bonus) or leaves the hotword (and loses
      the lookahead).

    New prefixes among them join the arena."""
    arena_ints, arena_floats, arena_size = arena
    trie, cache_map, cache_score, cache_state = tables[0], tables[2], tables[3], tables[4]
    beam_prefix, beam_p, beam_size = beams
    ints, floats, count = candidates
    n = count[b]
    sure, hoped, static_of = scratch[0, :n], scratch[1, :n], scratch[2, :n]
    best = -np.inf
    for s in range(n):
        if ints[b, s, 2] >= 0:
            static, look = arena_floats[ints[b, s, 2], 1], arena_floats[ints[b, s, 2], 2]
        else:
            key = ints[b, s, 5]
            if key >= 0:  # answered by now
                slot = cache_map[_slot(cache_map, key), 1]
                ints[b, s, 4] = cache_state[slot]
                floats[b, s, 2] += cache_score[slot]
            static, look = floats[b, s, 2] + _partial_score(trie, ints[b, s, 3], ints[b, s, 6], params), floats[b, s, 3]
            static_of[s] = static
        sure[s] = _logaddexp(floats[b, s, 0], floats[b, s, 1]) + static
        hoped[s] = sure[s] + look if look > 0.0 else -np.inf  # only prefixes inside a hotword
        best = max(best, sure[s])
    floor = best + params[BEAM_PRUNE_LOGP]
    order = order_scratch[:n]
    m = 0
    for s in range(n):
        if sure[s] >= floor or sure[s] == best:
            order[m] = s
            m += 1
    if m < min(width, int(params[MIN_KEEP])):  # too few for the nbest asked for: all with a finite score
        m = 0
        for s in range(n):
            if sure[s] > -np.inf or sure[s] == best:
                order[m] = s
                m += 1
    _sort_by(order, m, sure)
    kept = min(m, width)
    if extra > 0 and params[HAS_HOTWORDS] != 0.0:
        for i in range(kept):
            hoped[order[i]] = -np.inf  # in the beam already
        e = kept
        for s in range(n):
            if hoped[s] >= floor and hoped[s] > -np.inf:
                order[e] = s
                e += 1
        _sort_by(order[kept:], e - kept, hoped)
        kept = min(e, kept + extra)
    for i in range(kept):
        s = order[i]
        p = ints[b, s, 2]
        if p < 0:
            p = arena_size[0]
            arena_size[0] += 1
            arena_ints[p, 0], arena_ints[p, 1], arena_ints[p, 2], arena_ints[p, 3], arena_ints[p, 4] = ints[b, s, 0], ints[b, s, 1], ints[b, s, 3], ints[b, s, 4], ints[b, s, 6]
            arena_ints[p, 5] = ints[b, s, 7]
            arena_floats[p, 0], arena_floats[p, 1], arena_floats[p, 2] = floats[b, s, 2], static_of[s], floats[b, s, 3]
        beam_prefix[b, i] = p
        beam_p[b, i, 0], beam_p[b, i, 1] = floats[b, s, 0], floats[b, s, 1]
    beam_size[b] = kept


@_jit
def _room(tables, arena, items, width, per_item, completing, params):
    """Whether the tables can take one more frame of ``items`` utterances: ``width`` new
    prefixes, ``per_item`` candidates (``completing`` of which complete words) each."""
    trie, trie_map, cache_map, pending, sizes = tables[0], tables[1], tables[2], tables[5], tables[6]
    new_nodes = items * per_item * int(params[LONGEST_TOKEN]) if params[SPELL_WORDS] else 0
    return (
        arena[2][0] + items * width <= arena[0].shape[0]
        and sizes[TRIE_NODES] + new_nodes <= trie.shape[0]
        and 2 * (sizes[TRIE_KEYS] + new_nodes) <= trie_map.shape[0]
        and 2 * (sizes[CACHE_KEYS] + items * completing) <= cache_map.shape[0]
        and sizes[PENDING] + items * completing <= pending.shape[0]
    )


@_jit
def run(t, resume, lengths, log_probs, blank, width, extra, params, tokens, arena, tables, hot, beams, candidates, table):
    """Frames ``t`` onwards of the whole batch. ``resume``: frame ``t`` is expanded already
    (after :data:`NEED_LM`). Returns ``(status, frame)``: :data:`DONE`, or why it stopped and
    at which frame to go on (:data:`NEED_LM`: resume there; :data:`NEED_SPACE`: start there).
    ``width``: prefixes kept by score, ``extra``: more kept by hotword lookahead (see
    :func:`_prune`); the beams hold ``width + extra``."""
    B = log_probs.shape[1]
    per_item = candidates[0].shape[1]
    active = 0
    for b in range(B):
        active = max(active, lengths[b])
    chosen = np.empty(log_probs.shape[2], np.int64)
    scratch, order_scratch = np.empty((3, per_item)), np.empty(per_item, np.int64)
    while t < active:
        if not resume:
            items = 0
            for b in range(B):
                items += t < lengths[b]
            if not _room(tables, arena, items, width + extra, per_item, (width + extra) * int(params[COMPLETING]), params):
                return NEED_SPACE, t
            for b in range(B):
                if t < lengths[b]:
                    _expand(t, b, log_probs, blank, params, tokens, arena, tables, hot, beams, candidates, table, chosen)
            if tables[6][PENDING]:
                return NEED_LM, t
        resume = False
        for b in range(B):
            if t < lengths[b]:
                _prune(b, width, extra, params, arena, tables, beams, candidates, scratch, order_scratch)
        t += 1
    return DONE, t


@_jit
def finish(params, arena, tables, hot, beams, final_state, final_lm):
    """Complete the last word of every beam prefix into ``(B, W)`` LM states and scores
    (hotword bonuses won included; lookaheads end here). Returns False while the LM still has
    to score some words (answer them, call again)."""
    beam_prefix, _, beam_size = beams
    arena_ints, arena_floats = arena[0], arena[1]
    trie, _, cache_map, cache_score, cache_state, pending, sizes = tables
    hot_map, hot_fail, hot_gain, _ = hot
    for b in range(beam_prefix.shape[0]):
        for i in range(beam_size[b]):
            p = beam_prefix[b, i]
            node, lm = arena_ints[p, 2], arena_floats[p, 0]
            if params[HAS_HOTWORDS] != 0.0 and node != 0:
                lm += hot_gain[_hot_step(hot_map, hot_fail, arena_ints[p, 5], SEPARATOR)]
            final_state[b, i], final_lm[b, i], _ = _complete(
                trie, cache_map, cache_score, cache_state, pending, sizes, params, node, arena_ints[p, 3], lm)
    return tables[6][PENDING] == 0


@_jit
def take_pending(tables):
    """The unanswered LM keys and their words' code points (flat, with offsets); clears them."""
    trie, pending, sizes = tables[0], tables[5], tables[6]
    n = sizes[PENDING]
    keys = pending[:n].copy()
    offsets = np.zeros(n + 1, np.int64)
    for i in range(n):
        node = keys[i] & UNKNOWN_WORD
        offsets[i + 1] = offsets[i] + (trie[node, 3] if node != UNKNOWN_WORD else 0)
    codes = np.empty(offsets[-1], np.int32)
    for i in range(n):
        node = keys[i] & UNKNOWN_WORD
        if node != UNKNOWN_WORD:
            _spell(trie, node, codes[offsets[i] : offsets[i + 1]])
    sizes[PENDING] = 0
    return keys, codes, offsets


@_jit
def store_answers(tables, keys, scores, next_states):
    """Put the LM's answers for ``keys`` into the cache (the caller has made room)."""
    cache_map, cache_score, cache_state, sizes = tables[2], tables[3], tables[4], tables[6]
    for i in range(len(keys)):
        slot = sizes[CACHE_SLOTS]
        sizes[CACHE_SLOTS] += 1
        cache_map[_slot(cache_map, keys[i]), 1] = slot
        cache_score[slot], cache_state[slot] = scores[i], next_states[i]


@_jit
def tokens_of(arena_ints, prefix):
    """The token ids of a prefix, first to last."""
    n, p = 0, prefix
    while arena_ints[p, 0] != NO_PARENT:
        n += 1
        p = arena_ints[p, 0]
    out = np.empty(n, np.int64)
    p = prefix
    for i in range(n - 1, -1, -1):
        out[i] = arena_ints[p, 1]
        p = arena_ints[p, 0]
    return out


@_jit
def ctc_log_likelihoods(log_probs, lengths, labels, offsets, blank, out):
    """``out[n] = log P(labelling n | log_probs[:lengths[n], n])`` over all CTC alignments, for
    ``(T, N, C)`` log-probs and labellings ``labels[offsets[n]:offsets[n + 1]]``: the exact
    acoustic score of the decoder's hypotheses (the beam's own sum covers only the paths it
    kept). The forward recursion in log space (Graves et al. 2006, section 4.1), over the
    states that can still reach the end and could have been reached from the start. (Serial:
    numba's parallel workers spin after a parallel region, which on a busy or small machine
    slows the torch work that follows more than the few labellings gain.)"""
    for n in range(len(lengths)):
        L = offsets[n + 1] - offsets[n]
        S = 2 * L + 1
        alpha, new, ext = np.empty(S), np.empty(S), np.empty(S, np.int64)
        for s in range(S):
            ext[s] = blank if s % 2 == 0 else labels[offsets[n] + s // 2]
        frames = lengths[n]
        if frames == 0:
            out[n] = 0.0 if L == 0 else -np.inf
            continue
        for s in range(S):
            alpha[s] = -np.inf
        alpha[0] = log_probs[0, n, blank]
        if S > 1:
            alpha[1] = log_probs[0, n, ext[1]]
        for t in range(1, frames):
            lo = max(0, S - 2 * (frames - t))  # states from which the end is still in reach
            hi = min(S, 2 * t + 2)  # states reachable by now
            for s in range(lo, hi):
                a = alpha[s]
                b = alpha[s - 1] if s >= 1 else -np.inf
                c = alpha[s - 2] if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2] else -np.inf
                m = max(a, max(b, c))
                if m == -np.inf:
                    new[s] = -np.inf
                    continue
                # log-sum-exp; terms below _NEGLIGIBLE change no bit of 1 + ..., so peaky
                # frames (one predecessor carries it all) cost no exp or log
                total = 0.0
                for x in (a, b, c):
                    if x - m > _NEGLIGIBLE:
                        total += math.exp(x - m)
                new[s] = m + (math.log(total) if total != 1.0 else 0.0) + log_probs[t, n, ext[s]]
            for s in range(lo, hi):
                alpha[s] = new[s]
            if lo > 0:
                alpha[lo - 1] = -np.inf
        out[n] = _logaddexp(alpha[S - 1], alpha[S - 2]) if S > 1 else alpha[0]
