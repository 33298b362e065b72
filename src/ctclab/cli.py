"""The ``ctclab`` command line."""
from __future__ import annotations

import argparse
import sys


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        T, B, C, L = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be T,B,C,L (four integers), got {text!r}") from None
    if min(T, B, C, L) < 0 or C < 2 or T < 1 or B < 1:
        raise argparse.ArgumentTypeError(f"--shape needs T, B >= 1, C >= 2, L >= 0, got {text!r}")
    return T, B, C, L


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    shapes = list(args.shape or [])
    if args.grid:
        shapes += bench.GRID
    shapes = shapes or [bench.SEED_SHAPE]
    progress = (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    results = bench.run(
        shapes, device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
        memory=not args.no_memory, impls=args.impl or ("builtin", "autograd", "fused"), progress=progress,
    )
    print(bench.format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            f.write(bench.to_json(results))
    return 0


def load_emissions(path: str):
    """``.pt`` (a tensor) or ``.npy`` array of log-probs ``(T, C)`` or ``(T, B, C)``."""
    import numpy as np
    import torch

    try:
        if path.endswith(".npy"):
            data = torch.from_numpy(np.load(path))
        elif path.endswith(".pt"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"EMISSIONS must be a .pt or .npy file, got {path!r}")
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, ValueError) and "EMISSIONS" in str(error):
            raise
        raise ValueError(f"cannot read emissions from {path!r}: {error}") from None
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() not in (2, 3):
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"EMISSIONS must hold float log-probs (T, C) or (T, B, C), got {shape}")
    return data


def _vocab_and_emissions(args: argparse.Namespace):
    """The vocabulary and the log-probs of ``align`` and ``decode``, checked against each other."""
    from .vocab import Vocabulary

    vocab = Vocabulary.load(args.vocab)
    emissions = load_emissions(args.emissions)
    if emissions.shape[-1] != len(vocab):
        raise ValueError(f"EMISSIONS have {emissions.shape[-1]} classes but the vocabulary has {len(vocab)} tokens")
    if not 0 <= args.blank < len(vocab):
        raise ValueError(f"--blank must be a class index in [0, {len(vocab)}), got {args.blank}")
    return vocab, emissions.log_softmax(-1) if args.log_softmax else emissions


def _align(args: argparse.Namespace) -> int:
    import torch

    from . import formats
    from .align import STAR, alignment_posteriors, forced_align, token_spans, word_spans

    vocab, emissions = _vocab_and_emissions(args)
    if args.text is not None:
        texts = [args.text]
    else:
        try:
            texts = [line for line in open(args.text_file, encoding="utf-8").read().splitlines() if line.strip()]
        except OSError as error:
            raise ValueError(f"cannot read --text-file {args.text_file!r}: {error.strerror}") from None
    batch = emissions.unsqueeze(1) if emissions.dim() == 2 else emissions
    if batch.shape[1] != len(texts):
        raise ValueError(f"EMISSIONS hold {batch.shape[1]} utterances but {len(texts)} texts were given")
    encoded = [vocab.encode(text, args.case) for text in texts]
    star = [STAR] if args.star is not None else []
    rows = [star + ids + star for ids, _ in encoded]
    width = max(len(r) for r in rows)
    targets = torch.tensor([r + [1 if args.blank != 1 else 0] * (width - len(r)) for r in rows])
    target_lengths = torch.tensor([len(r) for r in rows])
    ali = forced_align(batch, targets, None, target_lengths, blank=args.blank, star=args.star)
    posteriors = alignment_posteriors(batch, targets, ali, None, target_lengths, args.blank, star=args.star) if args.confidence else None
    delimiter = vocab.index(vocab.delimiter) if vocab.delimiter is not None else None
    outputs, documents = [], []
    duration = batch.shape[0] * args.frame_shift
    for b, spans in enumerate(token_spans(ali, blank=args.blank, posteriors=posteriors)):
        utterance = args.utterance if len(texts) == 1 else f"{args.utterance}-{b + 1}"
        text_spans = [s for s in spans if s.token != STAR]
        words = word_spans(text_spans, separator=delimiter) if delimiter is not None else word_spans(text_spans, word_lengths=encoded[b][1])
        if args.format == "json":
            documents.append(formats.to_json(spans, words, vocab, args.frame_shift, utterance))
        elif args.format == "ctm":
            outputs.append(formats.to_ctm(words, vocab, args.frame_shift, utterance))
        elif args.format == "textgrid":
            outputs.append(formats.to_textgrid(words, spans, vocab, args.frame_shift, duration))
        elif args.format == "srt":
            outputs.append(formats.to_srt(words, vocab, args.frame_shift))
        else:
            outputs.append(formats.to_vtt(words, vocab, args.frame_shift))
    if args.format == "json":
        outputs = [formats.dumps_json(documents) + "\n"]
    if args.format in ("textgrid", "srt", "vtt") and len(texts) > 1 and not args.out:
        raise ValueError(f"--format {args.format} writes one utterance per file: align one utterance at a time")
    text = "".join(outputs)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        from .plot import plot_alignment
        from .targets import state_occupation

        target = targets[0, : target_lengths[0]]
        occupation = state_occupation(batch[:, 0], target, blank=args.blank, star=args.star)
        plot_alignment(batch[:, 0], target, ali.item(0), vocab, args.blank, occupation, out=args.plot)
    return 0


def _decode(args: argparse.Namespace) -> int:
    import json

    from .decode import BeamSearchDecoder
    from .lm import load_lm

    vocab, emissions = _vocab_and_emissions(args)
    if args.beam < 1 or args.nbest < 1:
        raise ValueError("--beam and --nbest must be >= 1")
    lm = load_lm(args.lm) if args.lm else None
    decoder = BeamSearchDecoder(vocab, blank=args.blank, beam_width=args.beam, lm=lm, alpha=args.alpha, beta=args.beta,
                                hotwords=args.hotword, hotword_weight=args.hotword_weight)
    results = decoder.decode(emissions, nbest=args.nbest)
    if args.format == "text":
        for hyps in results:
            print("\n".join(h.text for h in hyps))
    else:
        doc = [[{"text": h.text, "tokens": list(h.tokens), "acoustic_score": h.acoustic_score, "lm_score": h.lm_score,
                 "score": h.score, "words": [{"word": w.word, "start_frame": w.start, "end_frame": w.end,
                                              "start": w.start * args.frame_shift, "end": w.end * args.frame_shift}
                                             for w in h.words]} for h in hyps] for hyps in results]
        print(json.dumps(doc[0] if len(doc) == 1 else doc, indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctclab", description="CTC loss, alignment and decoding on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the built-in CTC loss against ctclab's autograd and fused paths")
    b.add_argument("--shape", type=_shape, action="append", help="T,B,C,L (repeatable); default: the seed's 128,256,32,60")
    b.add_argument("--grid", action="store_true", help="add the standard grid of six shapes")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    b.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--impl", action="append", choices=["builtin", "autograd", "fused"], help="subset to run (repeatable)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--json", metavar="FILE", help="write machine-readable results")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=_bench)

    emission_args = argparse.ArgumentParser(add_help=False)  # what align and decode both read
    emission_args.add_argument("emissions", help="log-probs (T, C) or (T, B, C) as .pt or .npy")
    emission_args.add_argument("--vocab", required=True, help="one token per line (line k = class k), or a JSON {token: index}")
    emission_args.add_argument("--blank", type=int, default=0, help="class index of blank (default 0)")
    emission_args.add_argument("--frame-shift", type=float, default=0.02, help="seconds per frame (default 0.02)")
    emission_args.add_argument("--log-softmax", action="store_true", help="EMISSIONS are logits: normalise them first")

    a = sub.add_parser("align", parents=[emission_args], help="forced alignment of a transcript to emissions, with word timings")
    text = a.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the transcript")
    text.add_argument("--text-file", help="transcripts, one line per utterance of EMISSIONS")
    a.add_argument("--format", choices=["json", "ctm", "textgrid", "srt", "vtt"], default="json")
    a.add_argument("--out", help="write there instead of standard output")
    a.add_argument("--plot", metavar="PNG", help="draw the alignment picture (first utterance)")
    a.add_argument("--star", type=float, metavar="PENALTY", help="wildcard at start and end: audio the text lacks is absorbed there")
    a.add_argument("--case", choices=["keep", "upper", "lower"], default="keep", help="change the text's case before lookup")
    a.add_argument("--confidence", action="store_true", help="add posterior-based confidences (forward-backward)")
    a.add_argument("--utterance", default="utt", help="utterance id for CTM/JSON")
    a.set_defaults(func=_align)

    d = sub.add_parser("decode", parents=[emission_args], help="prefix beam search decoding with an optional word n-gram LM")
    d.add_argument("--lm", help="ARPA word n-gram LM (kenlm is used when installed, else ctclab's reader)")
    d.add_argument("--alpha", type=float, default=0.5, help="LM weight")
    d.add_argument("--beta", type=float, default=1.0, help="word insertion bonus")
    d.add_argument("--beam", type=int, default=100)
    d.add_argument("--hotword", action="append", help="a word to favour (repeatable)")
    d.add_argument("--hotword-weight", type=float, default=10.0)
    d.add_argument("--nbest", type=int, default=1)
    d.add_argument("--format", choices=["text", "json"], default="text")
    d.set_defaults(func=_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        parser.error("--repeats must be >= 1")
    if getattr(args, "frame_shift", 1.0) <= 0:
        parser.error("--frame-shift must be > 0 seconds")
    try:
        return args.func(args)
    except ValueError as error:
        print(f"ctclab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
