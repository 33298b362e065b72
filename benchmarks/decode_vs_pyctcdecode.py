"""ctclab.BeamSearchDecoder against pyctcdecode on the same synthetic log-probs and ARPA LM.

pyctcdecode pins numpy < 2, so it runs in an interpreter of its own; set one up once with:

    python3 -m venv /tmp/pcd-venv && /tmp/pcd-venv/bin/pip install pyctcdecode 'numpy<2' kenlm

then: python benchmarks/decode_vs_pyctcdecode.py --pyctcdecode-python /tmp/pcd-venv/bin/python

--hotwords: decoding with 0, 10, 100 and 1,000 hotwords (--hotword-counts), half of each list
drawn from the words of the synthetic sentences (all of them where there are fewer), the rest
random letter strings that no sentence holds; both decoders get the same lists and weight.
"""
import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctclab.decode import DEFAULT_HOTWORD_WEIGHT, BeamSearchDecoder
from ctclab.lm import NGramLM, write_arpa
from ctclab.vocab import Vocabulary

WORKER = str(Path(__file__).with_name("_pyctcdecode_worker.py"))
LETTERS = "abcdefghijklmnopqrstuvwxyz'"


def corpus(rng, words=200, sentences=2000):
    vocab = ["".join(rng.choice(LETTERS[:-1]) for _ in range(rng.randint(2, 7))) for _ in range(words)]
    weights = [1.0 / (i + 1) for i in range(words)]
    return [" ".join(rng.choices(vocab, weights, k=rng.randint(3, 8))) for _ in range(sentences)]


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


def synthetic_set(utterances, sentences, labels, rng, confusion, path):
    """``utterances`` sentences drawn from ``sentences``, their synthetic log-probs, padded into
    one ``(B, T, C)`` batch (padding at -30) with their lengths, saved to ``path`` for the
    pyctcdecode worker."""
    tests = [sentences[rng.randrange(len(sentences))] for _ in range(utterances)]
    lps = [emissions(t, labels, rng, confusion=confusion) for t in tests]
    T = max(len(lp) for lp in lps)
    batch = np.full((len(lps), T, len(labels)), -30.0, dtype=np.float32)
    for i, lp in enumerate(lps):
        batch[i, : len(lp)] = lp
    lengths = np.array([len(lp) for lp in lps])
    np.savez(path, log_probs=batch, lengths=lengths)
    return tests, lps, batch, lengths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyctcdecode-python", required=True)
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--beam", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--confusion", type=float, nargs="+", default=[0.0, 0.1, 0.3],
                        help="test sets: chance per frame that a wrong letter gets about as much mass as the right one")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for pyctcdecode's decode_batch")
    parser.add_argument("--show", type=int, default=5, help="disagreements to print per decoder")
    parser.add_argument("--hotwords", action="store_true", help="time decoding with hotword lists instead (see above)")
    parser.add_argument("--hotword-counts", type=int, nargs="+", default=[0, 10, 100, 1000])
    parser.add_argument("--hotword-weight", type=float, default=DEFAULT_HOTWORD_WEIGHT,
                        help="for both decoders (both add it per hotword word found)")
    args = parser.parse_args()
    if args.hotwords:
        return hotword_mode(args)
    rng = random.Random(0)
    sentences = corpus(rng)
    labels = [""] + [" "] + list(LETTERS)
    vocab = Vocabulary(tuple(["<b>"] + labels[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        arpa = f"{tmp}/lm.arpa"
        write_arpa(sentences, arpa)
        lm = NGramLM.from_arpa(arpa)
        for confusion in args.confusion:
            tests, lps, batch, lengths = synthetic_set(args.utterances, sentences, labels, rng, confusion, f"{tmp}/data.npz")
            json.dump({"labels": labels, "alpha": args.alpha, "beta": args.beta, "beam_width": args.beam,
                       "processes": args.processes}, open(f"{tmp}/cfg.json", "w"))
            subprocess.run([args.pyctcdecode_python, WORKER, f"{tmp}/data.npz", arpa, f"{tmp}/cfg.json", f"{tmp}/out.json"], check=True)
            theirs = json.load(open(f"{tmp}/out.json"))
            decoder = BeamSearchDecoder(vocab.tokens, lm=lm, alpha=args.alpha, beta=args.beta, beam_width=args.beam)
            x = torch.from_numpy(batch).transpose(0, 1)
            decoder.decode(x[:, :2], torch.from_numpy(lengths[:2]))  # warm-up (numba, LM cache of other sentences)
            decoder = BeamSearchDecoder(vocab.tokens, lm=lm, alpha=args.alpha, beta=args.beta, beam_width=args.beam)
            t0 = time.perf_counter()
            ours = [decoder.decode(x[: lengths[i], i])[0][0].text for i in range(len(tests))]
            one_by_one = time.perf_counter() - t0
            decoder = BeamSearchDecoder(vocab.tokens, lm=lm, alpha=args.alpha, beta=args.beta, beam_width=args.beam)
            t0 = time.perf_counter()
            batched = [h[0].text for h in decoder.decode(x, torch.from_numpy(lengths))]
            in_batch = time.perf_counter() - t0
            assert batched == ours, "batched and one-by-one decoding differ"
            n = len(tests)
            correct = sum(a == t for a, t in zip(ours, tests))
            print(f"\n== confusion {confusion}: {n} utterances ({lengths.mean():.0f} frames on average), beam {args.beam}, "
                  f"alpha {args.alpha}, beta {args.beta}")
            print(f"ctclab: {1e3 * one_by_one / n:.2f} ms/utt one by one, {1e3 * in_batch / n:.2f} ms/utt as one batch; "
                  f"sentences right {correct}/{n}")
            for name, result in theirs.items():
                texts = [" ".join(t.split()) for t in result["texts"]]
                same = sum(a == b for a, b in zip(ours, texts))
                mine_better, theirs_better = 0, []
                for i, (a, b) in enumerate(zip(ours, texts)):
                    if a == b:
                        continue
                    lp = torch.from_numpy(lps[i]).double()
                    mine, other = decoder.score(lp, vocab.encode(a)[0]).score, decoder.score(lp, vocab.encode(b)[0]).score
                    mine_better += mine > other
                    if other > mine:
                        theirs_better.append(f"    theirs scores higher by {other - mine:.3f}: ctclab {a!r} | {b!r} | truth {tests[i]!r}")
                reference = one_by_one if "batch" not in name else in_batch
                print(f"{name}: same top hypothesis {same}/{n} ({100 * same / n:.0f}%); of the {n - same} others, "
                      f"ctclab's scores higher under the shared objective (CTC + LM) {mine_better}, theirs {len(theirs_better)}, "
                      f"tie {n - same - mine_better - len(theirs_better)}; "
                      f"sentences right {sum(b == t for b, t in zip(texts, tests))}/{n}; "
                      f"{1e3 * result['seconds'] / n:.2f} ms/utt -> ctclab {result['seconds'] / reference:.1f}x faster")
                print("\n".join(theirs_better))
                shown = 0
                for a, b, t in zip(ours, texts, tests):
                    if a != b and shown < args.show:
                        print(f"    ctclab {a!r} | {name} {b!r} | truth {t!r}")
                        shown += 1


def hotword_lists(rng, sentences, counts):
    """name -> list: half words of the sentences (at most all of them), half absent words."""
    said = sorted({w for s in sentences for w in s.split()})
    lists = {}
    for n in counts:
        present = rng.sample(said, min(n // 2, len(said)))
        absent = set()
        while len(absent) < n - len(present):
            w = "".join(rng.choice(LETTERS[:-1]) for _ in range(rng.randint(3, 8)))
            if w not in said:
                absent.add(w)
        lists[f"{n} hotwords"] = present + sorted(absent)
    return lists


def hotword_mode(args):
    rng = random.Random(0)
    sentences = corpus(rng)
    labels = [""] + [" "] + list(LETTERS)
    vocab = Vocabulary(tuple(["<b>"] + labels[1:]))
    lists = hotword_lists(rng, sentences, args.hotword_counts)
    with tempfile.TemporaryDirectory() as tmp:
        arpa = f"{tmp}/lm.arpa"
        write_arpa(sentences, arpa)
        lm = NGramLM.from_arpa(arpa)
        for confusion in args.confusion:
            tests, lps, batch, lengths = synthetic_set(args.utterances, sentences, labels, rng, confusion, f"{tmp}/data.npz")
            json.dump({"labels": labels, "alpha": args.alpha, "beta": args.beta, "beam_width": args.beam,
                       "hotwords": lists, "hotword_weight": args.hotword_weight}, open(f"{tmp}/cfg.json", "w"))
            subprocess.run([args.pyctcdecode_python, WORKER, f"{tmp}/data.npz", arpa, f"{tmp}/cfg.json", f"{tmp}/out.json"], check=True)
            theirs = json.load(open(f"{tmp}/out.json"))
            n = len(tests)
            print(f"\n== confusion {confusion}: {n} utterances ({lengths.mean():.0f} frames on average), beam {args.beam}, "
                  f"alpha {args.alpha}, beta {args.beta}, hotword weight {args.hotword_weight}")
            print("hotwords | ctclab ms/utt (one by one, batch) | pyctcdecode ms/utt | sentences right ctclab, pyctcdecode "
                  "| of the disagreements, higher objective: ctclab, pyctcdecode, tie")
            x = torch.from_numpy(batch).transpose(0, 1)
            for name, hotwords in lists.items():
                make = lambda: BeamSearchDecoder(vocab.tokens, lm=lm, alpha=args.alpha, beta=args.beta, beam_width=args.beam,  # noqa: E731
                                                 hotwords=hotwords, hotword_weight=args.hotword_weight)
                make().decode(x[:, :2], torch.from_numpy(lengths[:2]))  # warm-up (numba)
                decoder = make()
                t0 = time.perf_counter()
                ours = [decoder.decode(x[: lengths[i], i])[0][0].text for i in range(n)]
                one_by_one = time.perf_counter() - t0
                decoder = make()
                t0 = time.perf_counter()
                batched = [h[0].text for h in decoder.decode(x, torch.from_numpy(lengths))]
                in_batch = time.perf_counter() - t0
                assert batched == ours, "batched and one-by-one decoding differ"
                texts = [" ".join(t.split()) for t in theirs[name]["texts"]]
                better = [0, 0, 0]
                for i, (a, b) in enumerate(zip(ours, texts)):
                    if a != b:
                        lp = torch.from_numpy(lps[i]).double()
                        mine, other = decoder.score(lp, vocab.encode(a)[0]).score, decoder.score(lp, vocab.encode(b)[0]).score
                        better[0 if mine > other else 1 if other > mine else 2] += 1
                print(f"{name:>15} | {1e3 * one_by_one / n:6.2f}, {1e3 * in_batch / n:6.2f} | {1e3 * theirs[name]['seconds'] / n:8.2f} | "
                      f"{sum(a == t for a, t in zip(ours, tests))}/{n}, {sum(b == t for b, t in zip(texts, tests))}/{n} | "
                      f"{better[0]}, {better[1]}, {better[2]}")
                shown = 0
                for a, b, t in zip(ours, texts, tests):
                    if (a != t or b != t) and shown < args.show:
                        print(f"    ctclab {a!r} | pyctcdecode {b!r} | truth {t!r}")
                        shown += 1


if __name__ == "__main__":
    main()
