"""CPU kernels (numba) of :mod:`ctclab.decode`: best-path decoding (:func:`collapse_runs`) and the
prefix beam search. (The exact CTC score of its results is the loss's own forward recursion:
:func:`ctclab.decode._log_likelihoods`.)

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
enlarges it (:func:`make_room`, by the rule :func:`frame_needs` that :func:`run` checks). Both
get rare as the tables warm up: most frames run without leaving the kernel.

The search state is a handful of named structures (:class:`typing.NamedTuple` of arrays, which
numba passes as plain tuples: a field costs what a positional element does):

- :class:`Params`: the settings, for the whole search.
- :class:`Tokens`: what each vocabulary entry is (blank, delimiter, word start, plain) and spells.
- :class:`Prefixes`, the prefix arena: one row per prefix that entered a beam, ints
  :data:`PARENT`, :data:`TOKEN`, :data:`WORD_NODE` (the word being spelled, a trie node),
  :data:`LM_STATE`, :data:`WORD_CHARS` (its code points so far), :data:`HOT_STATE` (the hotword
  automaton's state) and floats :data:`LM_SCORE` (LM score of its completed words and hotword
  bonuses won), :data:`LOOKAHEAD` (hotword lookahead: see below), :data:`STATIC_SCORE` (sure
  static score: the LM score + the partial word's ``unk_offset``).
- :class:`Candidates`: per utterance, the prefixes of the next beam, merged, with the same
  columns first, then :data:`ROW` (its arena row, :data:`NEW` for a prefix not in it yet),
  :data:`PENDING_KEY`, and :data:`P_BLANK`/:data:`P_LABEL`, its two path probabilities.
- :class:`Beams`: per utterance, the arena rows kept and their two path probabilities.
- :class:`Trie`, the word trie over unicode code points (node :data:`ROOT` = empty word): per
  node ``parent``, ``code`` point, ``flags`` (:data:`LM_PREFIX`, :data:`LM_WORD`), ``depth``,
  and the child map ``node * CHARS + code point -> node``. The LM's vocabulary is inserted up
  front with flags; other spellings get flagless nodes when the search meets them, so a node
  id is a word.
- :class:`Hotwords`: an Aho-Corasick automaton (built by :mod:`ctclab.decode`) over the
  prefix's text as a stream of code points with :data:`SEPARATOR` before every word and after
  the last one; a hotword (one word or a phrase) is the pattern ``SEP w1 SEP w2 ... SEP``, so it
  matches whole words only, and every occurrence is found, overlapping ones too. ``moves``
  (``state * CHARS + code point -> child``), ``fail`` (failure links), ``gain`` (the bonus won
  on entering a state: every pattern that ends there) and ``look`` (the lookahead of a state:
  the share of a pattern's bonus it has spelled so far). The bonus counts only once a pattern
  is complete; the lookahead is a search heuristic, taken back as soon as the text leaves the
  pattern, and never part of a hypothesis's score.
- :class:`LMCache`: map ``state << STATE_SHIFT | node -> slot`` (:data:`ASKED`: asked, not
  answered), ``score`` (``alpha * log P + beta``), ``next_state`` (state id after the word),
  ``pending`` keys.
- :class:`MergeMap`: the per-frame map ``(parent, token) -> candidate`` that merges equal prefixes.

Hash maps are open addressing with linear probing over ``(capacity, 2)`` int64 arrays of
``key, value`` (key :data:`EMPTY` = free), at most half full (:data:`MAP_SLOTS_PER_KEY`).

Pruning (:func:`_prune`): a beam is the ``width`` best candidates by ``acoustic + sure
static`` within ``beam_prune_logp`` of the best of them (what it is without hotwords), plus up
to ``extra`` candidates inside a hotword, by ``acoustic + sure static + lookahead``, that reach
the same floor: a lookahead keeps its own prefix in sight and never pushes another one out.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from .backends.numba_kernels import NRT_OPTION

_jit = numba.njit(cache=True, nogil=True)
# helpers that allocate nothing: without NRT, the arrays they are handed cost no reference
# counting (atomic increments and decrements per call were most of the search's time; see
# ctclab.backends.numba_kernels)
_helper = numba.njit(cache=True, nogil=True, _nrt=False) if NRT_OPTION else _jit
# code that is part of its caller, in a function of its own for reading's sake: inlined at
# numba's IR level, because a call passes the structures it takes by value (a dozen arrays):
# as a call, _grown_prefix made _expand 1.8x slower
_inline = numba.njit(inline="always", nogil=True)

# -- constants ------------------------------------------------------------------------------------
#: word-trie node flags: some LM word starts so / the node is an LM word
LM_PREFIX, LM_WORD = 1, 8
#: trie nodes: the empty word (the root), and the node of every spelling the trie does not
#: hold when spellings need no identity of their own (no LM, or an LM that lists its
#: vocabulary: it scores all other words alike); new nodes come after them
ROOT, OTHER_WORD = 0, 1
RESERVED_NODES = 2
#: an LM cache key is ``state << STATE_SHIFT | node``: 32 bits for the node, 31 for the LM state
#: id (both far beyond what a decoder meets before it resets its cache, see ctclab.decode)
STATE_SHIFT = 32
#: the node that stands for every word outside the LM's vocabulary (an LM that lists its
#: vocabulary scores all of them as its unknown word); as a mask, a key's node
UNKNOWN_WORD = (1 << STATE_SHIFT) - 1
#: token kinds
PLAIN, DELIMITER, WORD_START, BLANK = 0, 1, 2, 3
#: what :func:`run` returns for
DONE, NEED_LM, NEED_SPACE = 0, 1, 2

#: a free slot of a hash map
EMPTY = -1
#: the parent (and token) of the empty prefix
NO_PARENT = -1
#: a candidate's :data:`ROW` when the prefix is not in the arena yet
NEW = -1
#: a candidate's :data:`PENDING_KEY` when its LM score is complete
NO_KEY = -1
#: an LM cache slot asked for and not answered yet
ASKED = -1

#: columns of a prefix's ints: in the arena (:attr:`Prefixes.ints`) and, first, a candidate's
PARENT, TOKEN, WORD_NODE, LM_STATE, WORD_CHARS, HOT_STATE = range(6)
PREFIX_INTS = 6
#: a candidate's own ints, after the prefix's
ROW, PENDING_KEY = 6, 7
CANDIDATE_INTS = 8
#: columns of a prefix's floats: in the arena and, first, a candidate's
LM_SCORE, LOOKAHEAD = 0, 1
#: the arena's own float (computed when a candidate enters it)
STATIC_SCORE = 2
PREFIX_FLOATS = 3
#: a candidate's own floats: log P of its paths that end in blank, in its last token
P_BLANK, P_LABEL = 2, 3
CANDIDATE_FLOATS = 4
#: bytes of one candidate (int64 and float64 columns)
CANDIDATE_BYTES = 8 * (CANDIDATE_INTS + CANDIDATE_FLOATS)
#: counters of :attr:`LMCache.counts`: keys in its map, answers stored, keys asked and not yet
#: handed to the decoder
N_KEYS, N_ANSWERS, N_PENDING = range(3)

#: hash maps keep at most one key per two slots (load factor 1/2): linear probing then needs
#: 2.5 probes per lookup that misses on average (Knuth), against 50 at a load factor of 0.9
MAP_SLOTS_PER_KEY = 2
#: the smallest hash map: 256 bytes, so that tiny maps (no hotwords, the merge map of a beam
#: of one) never grow on their first few keys
MAP_MIN_SLOTS = 16
CHARS = 1 << 21  # above any unicode code point
#: the code point that stands for a word boundary in the hotword automaton's stream (no
#: unicode character has it, so no spelled word contains it)
SEPARATOR = CHARS - 1
_GOLDEN = -7046029254386353131  # 2^64 / golden ratio, as int64 (Fibonacci hashing)
#: the hash folds the product's high bits, which depend on every bit of the key, onto the low
#: ones that the mask keeps; any shift near half the word works
_FOLD = 29
#: below this many candidates, insertion sort beats numpy's merge sort (no allocation, and
#: pruned beams are mostly in order already)
_INSERTION_SORT_MAX = 16
#: a partial word's ``unk_offset`` grows with its length past this many characters, as
#: pyctcdecode's (``AVG_TOKEN_LEN`` in its constants: "average number of characters expected
#: per token"), so that a long unknown spelling does not cost less than the unknown word it
#: will become
AVG_WORD_CHARS = 6.0


# -- the search state -----------------------------------------------------------------------------
class Params(NamedTuple):
    """The search's settings (one decoder's; ``width``, ``extra`` and ``min_keep`` per call)."""

    blank: int
    token_min_logp: float  # tokens below it at a frame are not tried there
    beam_prune_logp: float  # candidates this far below the best are dropped
    unk_offset: float  # cost of a partial word that no LM word starts with
    has_hotwords: bool
    has_lm: bool
    has_vocabulary: bool  # the LM lists its vocabulary: other words are its unknown word
    spell_words: bool  # every spelling gets a trie node of its own (an LM without a vocabulary tells all apart)
    longest_token: int  # code points of the longest token: trie nodes one candidate can add
    completing: int  # candidates per beam prefix that can complete a word (delimiter, word starts), + 1 for the end
    width: int  # prefixes a beam keeps by score
    extra: int  # prefixes it keeps on top for their hotword lookahead
    min_keep: int  # prefixes it keeps whatever beam_prune_logp says (nbest)


class Tokens(NamedTuple):
    """The vocabulary, as the kernels read it."""

    kind: np.ndarray  # (C,) PLAIN, DELIMITER, WORD_START or BLANK
    codes: np.ndarray  # code points of every token's spelling (BPE marker dropped), concatenated
    offsets: np.ndarray  # (C + 1,): token k spells codes[offsets[k]:offsets[k + 1]]


class Prefixes(NamedTuple):
    """The prefix arena: every prefix that entered a beam (a prefix is its parent + a token)."""

    ints: np.ndarray  # (capacity, PREFIX_INTS) int64
    floats: np.ndarray  # (capacity, PREFIX_FLOATS)
    count: np.ndarray  # (1,) rows in use


class Candidates(NamedTuple):
    """Per utterance, the candidates of its next beam (equal prefixes merged)."""

    ints: np.ndarray  # (B, per item, CANDIDATE_INTS) int64
    floats: np.ndarray  # (B, per item, CANDIDATE_FLOATS)
    count: np.ndarray  # (B,)


class Beams(NamedTuple):
    """Per utterance, its beam: arena rows and the log-probabilities of their paths."""

    prefix: np.ndarray  # (B, width + extra) arena rows
    p_blank: np.ndarray  # (B, width + extra): paths that end in blank
    p_label: np.ndarray  # (B, width + extra): paths that end in the prefix's last token
    size: np.ndarray  # (B,)


class MergeMap(NamedTuple):
    """The per-frame map ``(parent, token) -> candidate`` (:func:`_expand`): a slot counts as
    free unless stamped with the current frame's number, so it is never cleared."""

    key: np.ndarray  # (capacity,) a power of two
    candidate: np.ndarray
    stamp: np.ndarray
    frame: np.ndarray  # (1,) the number of the frame being expanded


class Trie(NamedTuple):
    """The word trie: one node per word (or beginning of a word) met."""

    parent: np.ndarray  # (capacity,) int64
    code: np.ndarray  # the node's last code point
    flags: np.ndarray  # LM_PREFIX | LM_WORD
    depth: np.ndarray  # code points from the root
    children: np.ndarray  # map node * CHARS + code -> child
    size: np.ndarray  # (1,) nodes in use; the child map holds size - RESERVED_NODES keys


class LMCache(NamedTuple):
    """The LM's answers: ``alpha * log P(word | state) + beta`` and the state after it."""

    slots: np.ndarray  # map state << STATE_SHIFT | node -> slot (ASKED until answered)
    score: np.ndarray  # (answers capacity,)
    next_state: np.ndarray  # (answers capacity,) int64
    pending: np.ndarray  # keys asked, not yet handed to the decoder
    counts: np.ndarray  # (3,) int64: N_KEYS, N_ANSWERS, N_PENDING


class Hotwords(NamedTuple):
    """The hotword automaton (see the module docstring)."""

    moves: np.ndarray  # map state * CHARS + code -> state
    fail: np.ndarray  # (states,) failure links
    gain: np.ndarray  # (states,) bonus won on entering the state
    look: np.ndarray  # (states,) lookahead of the state


# -- growing the tables: one rule -----------------------------------------------------------------
def map_slots(keys: int) -> int:
    """Slots of a hash map with room for ``keys`` keys: a power of two (a probe wraps by a mask)."""
    return max(MAP_MIN_SLOTS, 1 << (MAP_SLOTS_PER_KEY * keys - 1).bit_length())


def empty_map(keys: int) -> np.ndarray:
    """An empty hash map with room for ``keys`` keys."""
    return np.full((map_slots(keys), 2), EMPTY, np.int64)


def grown(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` if it has ``rows`` rows, else a copy with at least twice as many (amortised
    O(1) per row), contents kept."""
    if rows <= len(array):
        return array
    out = np.empty((max(rows, 2 * len(array)),) + array.shape[1:], array.dtype)
    out[: len(array)] = array
    return out


def grown_map(table: np.ndarray, keys: int) -> np.ndarray:
    """``table`` if it has room for ``keys`` keys, else its entries rehashed into a map at
    least twice as large."""
    if MAP_SLOTS_PER_KEY * keys <= len(table):
        return table
    new = empty_map(max(keys, len(table)))
    rehash(table, new)
    return new


@_helper
def frame_needs(prefixes, trie, cache, items, per_item, width, params):
    """What one more frame of ``items`` utterances needs, at most: ``(arena rows, trie nodes,
    child-map keys, LM cache keys, pending keys)``, for ``width`` beam prefixes and ``per_item``
    candidates per utterance. The one sizing rule: :func:`run` checks it before every frame
    (:func:`_fits`), :func:`make_room` grows the tables to it (running the same code in Python)."""
    new_nodes = items * per_item * params.longest_token if params.spell_words else 0
    completing = items * width * params.completing
    return (prefixes.count[0] + items * width, trie.size[0] + new_nodes, trie.size[0] - RESERVED_NODES + new_nodes,
            cache.counts[N_KEYS] + completing, cache.counts[N_PENDING] + completing)


@_helper
def _fits(prefixes, trie, cache, items, per_item, width, params):
    rows, nodes, trie_keys, cache_keys, pending = frame_needs(prefixes, trie, cache, items, per_item, width, params)
    return (rows <= prefixes.ints.shape[0] and nodes <= trie.parent.shape[0]
            and MAP_SLOTS_PER_KEY * trie_keys <= trie.children.shape[0]
            and MAP_SLOTS_PER_KEY * cache_keys <= cache.slots.shape[0] and pending <= cache.pending.shape[0])


def make_room(prefixes: Prefixes, trie: Trie, cache: LMCache, items: int, per_item: int, width: int,
              params: Params) -> tuple[Prefixes, Trie, LMCache]:
    """The tables, grown where :func:`frame_needs` says they are short."""
    needs = frame_needs.py_func(prefixes, trie, cache, items, per_item, width, params)  # the kernel's code, run by Python
    rows, nodes, trie_keys, cache_keys, pending = map(int, needs)
    if rows > len(prefixes.ints):
        prefixes = Prefixes(grown(prefixes.ints, rows), grown(prefixes.floats, rows), prefixes.count)
    if nodes > len(trie.parent) or MAP_SLOTS_PER_KEY * trie_keys > len(trie.children):
        trie = Trie(grown(trie.parent, nodes), grown(trie.code, nodes), grown(trie.flags, nodes), grown(trie.depth, nodes),
                    grown_map(trie.children, trie_keys), trie.size)
    if MAP_SLOTS_PER_KEY * cache_keys > len(cache.slots) or pending > len(cache.pending):
        cache = cache._replace(slots=grown_map(cache.slots, cache_keys), pending=grown(cache.pending, pending))
    return prefixes, trie, cache


def new_trie(nodes: int) -> Trie:
    """An empty trie (the root and :data:`OTHER_WORD`) with room for ``nodes`` nodes."""
    nodes = max(nodes, RESERVED_NODES)
    trie = Trie(np.zeros(nodes, np.int64), np.zeros(nodes, np.int64), np.zeros(nodes, np.int64), np.zeros(nodes, np.int64),
                empty_map(nodes), np.array([RESERVED_NODES], np.int64))
    trie.code[OTHER_WORD] = -1  # spells nothing; its depth 0 makes it an empty text
    return trie


def new_cache(keys: int) -> LMCache:
    """An empty LM cache with room for ``keys`` keys."""
    return LMCache(empty_map(keys), np.empty(keys), np.empty(keys, np.int64), np.empty(keys, np.int64), np.zeros(3, np.int64))


def new_search(B: int, width: int, per_item: int, rows: int, hot: Hotwords, hot_start: int) -> tuple[Prefixes, Beams, Candidates, MergeMap]:
    """The arena (``rows`` rows, the first ``B`` the empty prefix of every utterance), beams
    that hold it, and room for ``per_item`` candidates per utterance."""
    ints, floats = np.empty((max(rows, B), PREFIX_INTS), np.int64), np.empty((max(rows, B), PREFIX_FLOATS))
    ints[:B, PARENT], ints[:B, TOKEN], ints[:B, WORD_NODE], ints[:B, LM_STATE], ints[:B, WORD_CHARS] = NO_PARENT, NO_PARENT, ROOT, 0, 0
    ints[:B, HOT_STATE] = hot_start
    floats[:B, LM_SCORE], floats[:B, LOOKAHEAD], floats[:B, STATIC_SCORE] = 0.0, hot.look[hot_start], 0.0
    prefixes = Prefixes(ints, floats, np.array([B], np.int64))
    beams = Beams(np.zeros((B, width), np.int64), np.full((B, width), -np.inf), np.full((B, width), -np.inf), np.ones(B, np.int64))
    beams.prefix[:, 0] = np.arange(B)
    beams.p_blank[:, 0] = 0.0
    candidates = Candidates(np.empty((B, per_item, CANDIDATE_INTS), np.int64), np.empty((B, per_item, CANDIDATE_FLOATS)),
                            np.zeros(B, np.int64))
    slots = map_slots(per_item)
    merge = MergeMap(np.zeros(slots, np.int64), np.zeros(slots, np.int64), np.zeros(slots, np.int64), np.zeros(1, np.int64))
    return prefixes, beams, candidates, merge


# -- hash maps ------------------------------------------------------------------------------------
@_helper
def _hash(key, mask):
    x = key * _GOLDEN
    return (x ^ (x >> _FOLD)) & mask


@_helper
def _slot(table, key):
    """Where ``key`` is in the map ``table`` ``(capacity, 2)``, or the empty slot it would take."""
    mask = table.shape[0] - 1
    h = _hash(key, mask)
    while table[h, 0] != EMPTY and table[h, 0] != key:
        h = (h + 1) & mask
    return h


@_jit
def rehash(old, new):
    """Move every entry of map ``old`` into the empty map ``new``."""
    for i in range(old.shape[0]):
        if old[i, 0] != EMPTY:
            h = _slot(new, old[i, 0])
            new[h, 0], new[h, 1] = old[i, 0], old[i, 1]


@_jit
def fill_map(table, keys, values):
    """Put ``keys -> values`` into the empty map ``table`` (room made by the caller)."""
    for i in range(len(keys)):
        h = _slot(table, keys[i])
        table[h, 0], table[h, 1] = keys[i], values[i]


# -- best path ------------------------------------------------------------------------------------
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


# -- words: trie, LM, hotwords --------------------------------------------------------------------
@_helper
def _logaddexp(a, b):
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


@_helper
def _child(trie, params, node, code):
    """The trie node of ``node``'s spelling + ``code``, made if need be (and spellings need
    identities: else :data:`OTHER_WORD`)."""
    children = trie.children
    key = node * CHARS + code
    h = _slot(children, key)
    if children[h, 0] == key:
        return children[h, 1]
    if node == OTHER_WORD or not params.spell_words:
        return OTHER_WORD
    child = trie.size[0]
    trie.size[0] += 1
    trie.parent[child], trie.code[child], trie.flags[child], trie.depth[child] = node, code, 0, trie.depth[node] + 1
    children[h, 0], children[h, 1] = key, child
    return child


@_jit
def insert_word(trie, codes, prefix_flag, word_flag, params):
    """Insert a word (code points) into the trie, or-ing ``prefix_flag`` into every node on its
    path and ``word_flag`` into its last node. The caller has made room."""
    node = ROOT
    for code in codes:
        node = _child(trie, params, node, code)
        trie.flags[node] |= prefix_flag
    trie.flags[node] |= word_flag


@_helper
def _spell(trie, node, out):
    for i in range(trie.depth[node] - 1, -1, -1):
        out[i] = trie.code[node]
        node = trie.parent[node]


@_helper
def _partial_score(trie, node, chars, params):
    """Score of a word being spelled (``chars`` code points so far): ``unk_offset`` when no LM
    word starts so (times ``chars / AVG_WORD_CHARS`` past that length, as pyctcdecode does)."""
    if node == ROOT or not params.has_vocabulary or trie.flags[node] & LM_PREFIX:
        return 0.0
    return params.unk_offset * max(1.0, chars / AVG_WORD_CHARS)


@_helper
def _hot_step(hot, state, code):
    """The hotword automaton's state after ``code`` (Aho-Corasick: the longest suffix of the
    stream that begins some pattern; 0 = none)."""
    moves = hot.moves
    while True:
        key = state * CHARS + code
        h = _slot(moves, key)
        if moves[h, 0] == key:
            return moves[h, 1]
        if state == 0:
            return 0
        state = hot.fail[state]


@_helper
def _complete(trie, cache, params, node, state, lm):
    """``(state, lm, pending key)`` after the word at ``node`` completes; with a pending key
    (not :data:`NO_KEY`) the LM's part is still to come from the cache."""
    if node == ROOT or not params.has_lm:
        return state, lm, NO_KEY
    if params.has_vocabulary and not trie.flags[node] & LM_WORD:
        node = UNKNOWN_WORD
    slots, counts = cache.slots, cache.counts
    key = (state << STATE_SHIFT) | node
    h = _slot(slots, key)
    if slots[h, 0] == key:
        slot = slots[h, 1]
        if slot != ASKED:
            return cache.next_state[slot], lm + cache.score[slot], NO_KEY
        return state, lm, key
    slots[h, 0], slots[h, 1] = key, ASKED
    counts[N_KEYS] += 1
    cache.pending[counts[N_PENDING]] = key
    counts[N_PENDING] += 1
    return state, lm, key


# -- one frame: expand, prune ---------------------------------------------------------------------
@_helper
def _choose(row, params, chosen):
    """The tokens to try at a frame (log-probs ``row``) into ``chosen``; how many. Blank is
    tried anyway; without a token at ``token_min_logp``, the best one (an utterance never
    stalls for want of a token)."""
    n_chosen, best = 0, -1
    for k in range(row.shape[0]):
        if k == params.blank:
            continue
        if row[k] >= params.token_min_logp:
            chosen[n_chosen] = k
            n_chosen += 1
        if best < 0 or row[k] > row[best]:
            best = k
    if n_chosen == 0 and best >= 0:
        chosen[0] = best
        n_chosen = 1
    return n_chosen


@_inline
def _grown_prefix(prefixes, p, k, tokens, trie, cache, hot, params):
    """What arena prefix ``p`` + token ``k`` knows of its words: ``(word node, LM state, word
    characters, LM score, pending key, hotword state)``. A delimiter or word-start token
    completes the word being spelled (its LM score, and the hotwords that end with it)."""
    ints = prefixes.ints
    node, state, chars, lm, pending_key = ints[p, WORD_NODE], ints[p, LM_STATE], ints[p, WORD_CHARS], prefixes.floats[p, LM_SCORE], NO_KEY
    hot_state = ints[p, HOT_STATE]
    kind = tokens.kind[k]
    if kind == DELIMITER or kind == WORD_START:
        if params.has_hotwords and node != ROOT:  # a word ends: hotwords that end with it count
            hot_state = _hot_step(hot, hot_state, SEPARATOR)
            lm += hot.gain[hot_state]
        state, lm, pending_key = _complete(trie, cache, params, node, state, lm)
        node, chars = ROOT, 0
    if kind != DELIMITER:
        for c in range(tokens.offsets[k], tokens.offsets[k + 1]):
            node = _child(trie, params, node, tokens.codes[c])
            if params.has_hotwords:
                hot_state = _hot_step(hot, hot_state, tokens.codes[c])
        chars += tokens.offsets[k + 1] - tokens.offsets[k]
    return node, state, chars, lm, pending_key, hot_state


@_helper
def _expand(t, b, log_probs, params, tokens, prefixes, trie, cache, hot, beams, candidates, merge, chosen):
    """Frame ``t`` of utterance ``b``: candidates for the next beam, merged by prefix
    (a prefix is its parent and last token: :class:`MergeMap`)."""
    ci, cf = candidates.ints, candidates.floats
    C = log_probs.shape[2]
    row = log_probs[t, b]
    n_chosen = _choose(row, params, chosen)
    frame = merge.frame[0] + 1
    merge.frame[0] = frame
    mask = MAP_MIN_SLOTS - 1  # as small a map as this frame allows: fewer cache lines
    while mask + 1 < MAP_SLOTS_PER_KEY * beams.size[b] * (1 + n_chosen):
        mask = 2 * mask + 1
    n = 0
    # every beam prefix first, so that a child equal to one of them merges into it
    for grow in range(2):
        for i in range(beams.size[b]):
            p = beams.prefix[b, i]
            p_blank, p_label = beams.p_blank[b, i], beams.p_label[b, i]
            total = _logaddexp(p_blank, p_label)
            last = prefixes.ints[p, TOKEN]
            for j in range(n_chosen if grow else 1):
                parent, k = (p, chosen[j]) if grow else (prefixes.ints[p, PARENT], last)
                key = (parent + 1) * (C + 1) + k + 1
                h = _hash(key, mask)
                while merge.stamp[h] == frame and merge.key[h] != key:
                    h = (h + 1) & mask
                if merge.stamp[h] == frame:
                    s = merge.candidate[h]
                else:
                    merge.key[h], merge.candidate[h], merge.stamp[h] = key, n, frame
                    s = n
                    n += 1
                    cf[b, s, P_BLANK] = cf[b, s, P_LABEL] = -np.inf
                    ci[b, s, PARENT], ci[b, s, TOKEN], ci[b, s, ROW] = parent, k, NEW if grow else p
                    if grow:
                        node, state, chars, lm, pending_key, hot_state = _grown_prefix(prefixes, p, k, tokens, trie, cache, hot, params)
                        ci[b, s, WORD_NODE], ci[b, s, LM_STATE], ci[b, s, WORD_CHARS] = node, state, chars
                        ci[b, s, HOT_STATE], ci[b, s, PENDING_KEY] = hot_state, pending_key
                        cf[b, s, LM_SCORE], cf[b, s, LOOKAHEAD] = lm, hot.look[hot_state]
                if not grow:  # stay: a blank, or the last token once more
                    cf[b, s, P_BLANK] = _logaddexp(cf[b, s, P_BLANK], total + row[params.blank])
                    if last >= 0:
                        cf[b, s, P_LABEL] = _logaddexp(cf[b, s, P_LABEL], p_label + row[last])
                elif k == last:  # the same token again is a new one only after a blank
                    cf[b, s, P_LABEL] = _logaddexp(cf[b, s, P_LABEL], p_blank + row[k])
                else:
                    cf[b, s, P_LABEL] = _logaddexp(cf[b, s, P_LABEL], total + row[k])
    candidates.count[b] = n


@_jit
def _sort_by(order, m, score):
    """``order[:m]`` sorted by ``score``, best first (stable: ties keep their order)."""
    if m <= _INSERTION_SORT_MAX:
        for i in range(1, m):
            s, j = order[i], i
            while j > 0 and score[order[j - 1]] < score[s]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = s
    else:
        order[:m] = order[:m][np.argsort(-score[order[:m]], kind="mergesort")]


@_helper
def _scores(b, params, prefixes, trie, cache, candidates, sure, hoped, static_of):
    """Per candidate of utterance ``b``: ``sure`` (acoustic + static score), ``hoped`` (that +
    its hotword lookahead, -inf outside a hotword) and, for new prefixes, ``static_of`` (the
    static score, LM answers asked for taken in). Returns the best sure score."""
    ci, cf = candidates.ints, candidates.floats
    slots = cache.slots
    best = -np.inf
    for s in range(candidates.count[b]):
        row = ci[b, s, ROW]
        if row != NEW:
            static, look = prefixes.floats[row, STATIC_SCORE], prefixes.floats[row, LOOKAHEAD]
        else:
            key = ci[b, s, PENDING_KEY]
            if key != NO_KEY:  # answered by now
                slot = slots[_slot(slots, key), 1]
                ci[b, s, LM_STATE] = cache.next_state[slot]
                cf[b, s, LM_SCORE] += cache.score[slot]
            static = cf[b, s, LM_SCORE] + _partial_score(trie, ci[b, s, WORD_NODE], ci[b, s, WORD_CHARS], params)
            look = cf[b, s, LOOKAHEAD]
            static_of[s] = static
        sure[s] = _logaddexp(cf[b, s, P_BLANK], cf[b, s, P_LABEL]) + static
        hoped[s] = sure[s] + look if look > 0.0 else -np.inf  # only prefixes inside a hotword
        best = max(best, sure[s])
    return best


@_helper
def _keep(b, kept, order, prefixes, beams, candidates, static_of):
    """The candidates ``order[:kept]`` become utterance ``b``'s beam; new prefixes join the arena."""
    ci, cf = candidates.ints, candidates.floats
    ai, af = prefixes.ints, prefixes.floats
    for i in range(kept):
        s = order[i]
        p = ci[b, s, ROW]
        if p == NEW:
            p = prefixes.count[0]
            prefixes.count[0] += 1
            for column in range(PREFIX_INTS):
                ai[p, column] = ci[b, s, column]
            af[p, LM_SCORE], af[p, LOOKAHEAD], af[p, STATIC_SCORE] = cf[b, s, LM_SCORE], cf[b, s, LOOKAHEAD], static_of[s]
        beams.prefix[b, i] = p
        beams.p_blank[b, i], beams.p_label[b, i] = cf[b, s, P_BLANK], cf[b, s, P_LABEL]
    beams.size[b] = kept


@_jit
def _prune(b, params, prefixes, trie, cache, beams, candidates, scratch, order_scratch):
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
    n = candidates.count[b]
    sure, hoped, static_of = scratch[0, :n], scratch[1, :n], scratch[2, :n]
    best = _scores(b, params, prefixes, trie, cache, candidates, sure, hoped, static_of)
    floor = best + params.beam_prune_logp
    order = order_scratch[:n]
    m = 0
    for s in range(n):
        if sure[s] >= floor or sure[s] == best:
            order[m] = s
            m += 1
    if m < min(params.width, params.min_keep):  # too few for the nbest asked for: all with a finite score
        m = 0
        for s in range(n):
            if sure[s] > -np.inf or sure[s] == best:
                order[m] = s
                m += 1
    _sort_by(order, m, sure)
    kept = min(m, params.width)
    if params.extra > 0 and params.has_hotwords:
        for i in range(kept):
            hoped[order[i]] = -np.inf  # in the beam already
        e = kept
        for s in range(n):
            if hoped[s] >= floor and hoped[s] > -np.inf:
                order[e] = s
                e += 1
        _sort_by(order[kept:], e - kept, hoped)
        kept = min(e, kept + params.extra)
    _keep(b, kept, order, prefixes, beams, candidates, static_of)


# -- the search -----------------------------------------------------------------------------------
@_jit
def run(t, resume, lengths, log_probs, params, tokens, prefixes, trie, cache, hot, beams, candidates, merge):
    """Frames ``t`` onwards of the whole batch. ``resume``: frame ``t`` is expanded already
    (after :data:`NEED_LM`). Returns ``(status, frame)``: :data:`DONE`, or why it stopped and
    at which frame to go on (:data:`NEED_LM`: resume there; :data:`NEED_SPACE`: start there).
    The beams hold ``params.width + params.extra`` prefixes (see :func:`_prune`)."""
    B = log_probs.shape[1]
    per_item = candidates.ints.shape[1]
    width = params.width + params.extra
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
            if not _fits(prefixes, trie, cache, items, per_item, width, params):
                return NEED_SPACE, t
            for b in range(B):
                if t < lengths[b]:
                    _expand(t, b, log_probs, params, tokens, prefixes, trie, cache, hot, beams, candidates, merge, chosen)
            if cache.counts[N_PENDING]:
                return NEED_LM, t
        resume = False
        for b in range(B):
            if t < lengths[b]:
                _prune(b, params, prefixes, trie, cache, beams, candidates, scratch, order_scratch)
        t += 1
    return DONE, t


@_jit
def finish(params, prefixes, trie, cache, hot, beams, final_state, final_lm):
    """Complete the last word of every beam prefix into ``(B, W)`` LM states and scores
    (hotword bonuses won included; lookaheads end here). Returns False while the LM still has
    to score some words (answer them, call again)."""
    ints, floats = prefixes.ints, prefixes.floats
    for b in range(beams.prefix.shape[0]):
        for i in range(beams.size[b]):
            p = beams.prefix[b, i]
            node, lm = ints[p, WORD_NODE], floats[p, LM_SCORE]
            if params.has_hotwords and node != ROOT:
                lm += hot.gain[_hot_step(hot, ints[p, HOT_STATE], SEPARATOR)]
            final_state[b, i], final_lm[b, i], _ = _complete(trie, cache, params, node, ints[p, LM_STATE], lm)
    return cache.counts[N_PENDING] == 0


@_jit
def take_pending(trie, cache):
    """The unanswered LM keys and their words' code points (flat, with offsets); clears them."""
    n = cache.counts[N_PENDING]
    keys = cache.pending[:n].copy()
    offsets = np.zeros(n + 1, np.int64)
    for i in range(n):
        node = keys[i] & UNKNOWN_WORD
        offsets[i + 1] = offsets[i] + (trie.depth[node] if node != UNKNOWN_WORD else 0)
    codes = np.empty(offsets[-1], np.int32)
    for i in range(n):
        node = keys[i] & UNKNOWN_WORD
        if node != UNKNOWN_WORD:
            _spell(trie, node, codes[offsets[i] : offsets[i + 1]])
    cache.counts[N_PENDING] = 0
    return keys, codes, offsets


@_jit
def store_answers(cache, keys, scores, next_states):
    """Put the LM's answers for ``keys`` into the cache (the caller has made room)."""
    slots, counts = cache.slots, cache.counts
    for i in range(len(keys)):
        slot = counts[N_ANSWERS]
        counts[N_ANSWERS] += 1
        slots[_slot(slots, keys[i]), 1] = slot
        cache.score[slot], cache.next_state[slot] = scores[i], next_states[i]



# -- entry points for plain tuples ----------------------------------------------------------------
# numba unboxes a named-tuple argument in about three times a plain tuple's time (1.6 against
# 0.5 us for four arrays, measured): the search's per-frame entry points come in a version that
# takes its structures as plain tuples (``tuple(structure)``) and names them again inside, which
# saves ~1 us per structure and call (a dozen calls per utterance, nine structures each).
@_jit
def run_plain(t, resume, lengths, log_probs, params, tokens, prefixes, trie, cache, hot, beams, candidates, merge):
    """:func:`run`, its structures passed as plain tuples."""
    return run(t, resume, lengths, log_probs, Params(*params), Tokens(*tokens), Prefixes(*prefixes), Trie(*trie),
               LMCache(*cache), Hotwords(*hot), Beams(*beams), Candidates(*candidates), MergeMap(*merge))


@_jit
def finish_plain(params, prefixes, trie, cache, hot, beams, final_state, final_lm):
    """:func:`finish`, its structures passed as plain tuples."""
    return finish(Params(*params), Prefixes(*prefixes), Trie(*trie), LMCache(*cache), Hotwords(*hot), Beams(*beams),
                  final_state, final_lm)


@_jit
def take_pending_plain(trie, cache):
    """:func:`take_pending`, its structures passed as plain tuples."""
    return take_pending(Trie(*trie), LMCache(*cache))


@_jit
def store_answers_plain(cache, keys, scores, next_states):
    """:func:`store_answers`, the cache passed as a plain tuple."""
    store_answers(LMCache(*cache), keys, scores, next_states)

@_jit
def tokens_of(prefix_ints, prefix):
    """The token ids of a prefix (an arena row), first to last."""
    n, p = 0, prefix
    while prefix_ints[p, PARENT] != NO_PARENT:
        n += 1
        p = prefix_ints[p, PARENT]
    out = np.empty(n, np.int64)
    p = prefix
    for i in range(n - 1, -1, -1):
        out[i] = prefix_ints[p, TOKEN]
        p = prefix_ints[p, PARENT]
    return out
