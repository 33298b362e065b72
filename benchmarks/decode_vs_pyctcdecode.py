"""ctclab.BeamSearchDecoder against pyctcdecode on the same synthetic log-probs and ARPA LM.

pyctcdecode pins numpy < 2, so it runs in an interpreter of its own; set one up once with:

    python3 -m venv /tmp/pcd-venv && /tmp/pcd-venv/bin/pip install pyctcdecode 'numpy<2' kenlm

then: python benchmarks/decode_vs_pyctcdecode.py --pyctcdecode-python /tmp/pcd-venv/bin/python
"""
import argparse
import json
import math
import random
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ctclab.decode import BeamSearchDecoder
from ctclab.lm import NGramLM

WORKER = str(Path(__file__).with_name("_pyctcdecode_worker.py"))
LETTERS = "abcdefghijklmnopqrstuvwxyz'"


def corpus(rng, words=200, sentences=2000):
    vocab = ["".join(rng.choice(LETTERS[:-1]) for _ in range(rng.randint(2, 7))) for _ in range(words)]
    weights = [1.0 / (i + 1) for i in range(words)]
    return [" ".join(rng.choices(vocab, weights, k=rng.randint(3, 8))) for _ in range(sentences)]


def write_arpa(sentences, path):
    """A bigram ARPA with absolute discounting (d = 0.5) and back-off weights."""
    uni, bi = Counter(), Counter()
    for s in sentences:
        w = ["<s>"] + s.split() + ["</s>"]
        uni.update(w)
        bi.update(zip(w, w[1:]))
    total = sum(uni.values()) - uni["<s>"]
    p1 = {w: (c / total if w != "<s>" else 1e-99) for w, c in uni.items()}
    follow = Counter()
    for (a, _), c in bi.items():
        follow[a] += c
    kinds = Counter(a for a, _ in bi.keys())
    p2 = {(a, b): (c - 0.5) / follow[a] for (a, b), c in bi.items()}
    lines = ["\\data\\", f"ngram 1={len(uni)}", f"ngram 2={len(bi)}", "", "\\1-grams:"]
    for w in uni:
        left = 0.5 * kinds[w] / follow[w] if follow[w] else 1.0
        seen = sum(p1[b] for (a, b) in bi if a == w) if follow[w] else 0.0
        bo = math.log10(left / max(1e-12, 1 - seen)) if follow[w] else 0.0
        lp = -99.0 if w == "<s>" else math.log10(p1[w])
        lines.append(f"{lp:.6f}\t{w}\t{bo:.6f}")
    lines += ["", "\\2-grams:"] + [f"{math.log10(p):.6f}\t{a} {b}" for (a, b), p in p2.items()] + ["", "\\end\\", ""]
    Path(path).write_text("\n".join(lines))


def emissions(text, labels, rng, frames_per_char=(2, 4), confusion=0.3):
    """Log-probs of a noisy acoustic model saying ``text``: every frame puts most mass on the true
    token (or blank), and with probability ``confusion`` a similar mass on a random other letter."""
    index = {c: i for i, c in enumerate(labels)}
    frames = []
    for ch in text:
        frames += [index[ch]] * rng.randint(*frames_per_char) + [0]
    C = len(labels)
    logits = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 1, (len(frames), C))
    for t, k in enumerate(frames):
        logits[t, k] += 6.0
        if rng.random() < confusion:
            logits[t, rng.randrange(2, C)] += rng.uniform(4.5, 6.5)
    return torch.tensor(logits).log_softmax(-1).float().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyctcdecode-python", required=True)
    parser.add_argument("--utterances", type=int, default=100)
    parser.add_argument("--beam", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    args = parser.parse_args()
    rng = random.Random(0)
    sentences = corpus(rng)
    labels = [""] + [" "] + list(LETTERS)
    tests = [sentences[rng.randrange(len(sentences))] for _ in range(args.utterances)]
    lps = [emissions(t, labels, rng) for t in tests]
    T = max(len(lp) for lp in lps)
    batch = np.full((len(lps), T, len(labels)), -30.0, dtype=np.float32)
    for i, lp in enumerate(lps):
        batch[i, : len(lp)] = lp
    lengths = np.array([len(lp) for lp in lps])
    with tempfile.TemporaryDirectory() as tmp:
        arpa = f"{tmp}/lm.arpa"
        write_arpa(sentences, arpa)
        np.savez(f"{tmp}/data.npz", log_probs=batch, lengths=lengths)
        json.dump({"labels": labels, "alpha": args.alpha, "beta": args.beta, "beam_width": args.beam}, open(f"{tmp}/cfg.json", "w"))
        subprocess.run([args.pyctcdecode_python, WORKER, f"{tmp}/data.npz", arpa, f"{tmp}/cfg.json", f"{tmp}/out.json"], check=True)
        theirs = json.load(open(f"{tmp}/out.json"))
        lm = NGramLM.from_arpa(arpa)
        decoder = BeamSearchDecoder(["<b>"] + labels[1:], lm=lm, alpha=args.alpha, beta=args.beta, beam_width=args.beam,
                                    token_min_logp=-5.0, word_delimiter=" ")
        x = torch.from_numpy(batch).transpose(0, 1)
        t0 = time.perf_counter()
        ours = [h[0].text for h in decoder.decode(x, torch.from_numpy(lengths))]
        seconds = time.perf_counter() - t0
    same = sum(a == b.strip() for a, b in zip(ours, theirs["texts"]))
    correct_ours = sum(a == t for a, t in zip(ours, tests))
    correct_theirs = sum(b.strip() == t for b, t in zip(theirs["texts"], tests))
    n = len(tests)
    print(f"{n} utterances, beam {args.beam}: same top hypothesis {same}/{n} ({100 * same / n:.0f}%); "
          f"exact-sentence accuracy ctclab {correct_ours}/{n}, pyctcdecode {correct_theirs}/{n}")
    print(f"time per utterance: ctclab {1e3 * seconds / n:.1f} ms, pyctcdecode {1e3 * theirs['seconds'] / n:.1f} ms "
          f"({theirs['seconds'] / seconds:.2f}x)")
    for a, b, t in list(zip(ours, theirs["texts"], tests))[:200]:
        if a != b.strip():
            print(f"  differ: ctclab {a!r} | pyctcdecode {b.strip()!r} | truth {t!r}")


if __name__ == "__main__":
    main()
