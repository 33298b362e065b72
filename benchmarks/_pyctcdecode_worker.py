"""Runs pyctcdecode (and ctc-beam-decoder, when installed) on saved log-probs, in their own
interpreter (pyctcdecode pins numpy < 2). Writes texts and seconds per decoder variant; with
``hotwords`` in the config (name -> list), pyctcdecode's decode() once per list instead."""
import json
import multiprocessing
import sys
import time

import numpy as np


def timed(fn, items):
    fn(items[0])  # warm-up
    texts, t0 = [], time.perf_counter()
    for x in items:
        texts.append(fn(x))
    return {"texts": texts, "seconds": time.perf_counter() - t0}


def main():
    from pyctcdecode import build_ctcdecoder

    data_path, arpa, config_path, out_path = sys.argv[1:5]
    config = json.load(open(config_path))
    data = np.load(data_path)
    items = [data["log_probs"][i][: data["lengths"][i]] for i in range(len(data["lengths"]))]
    labels, beam = config["labels"], config["beam_width"]
    kw = {"alpha": config["alpha"], "beta": config["beta"]}
    out = {}
    decoder = build_ctcdecoder(labels, kenlm_model_path=arpa, **kw)
    if "hotwords" in config:  # hotword mode: decode() alone, with the lists given
        for name, hotwords in config["hotwords"].items():
            hw = {"hotwords": hotwords, "hotword_weight": config["hotword_weight"]} if hotwords else {}
            out[name] = timed(lambda x: decoder.decode(x, beam_width=beam, **hw), items)
        json.dump(out, open(out_path, "w"))
        return
    # decode(): what pyctcdecode users call; it turns on history pruning (prune_history=True)
    out["pyctcdecode"] = timed(lambda x: decoder.decode(x, beam_width=beam), items)
    # decode_beams(): no history pruning
    out["pyctcdecode (no history pruning)"] = timed(lambda x: decoder.decode_beams(x, beam_width=beam)[0][0], items)
    with multiprocessing.get_context("fork").Pool(config["processes"]) as pool:
        decoder.decode_batch(pool, items[:2], beam_width=beam)
        t0 = time.perf_counter()
        texts = decoder.decode_batch(pool, items, beam_width=beam)
        out["pyctcdecode decode_batch"] = {"texts": texts, "seconds": time.perf_counter() - t0}
    try:
        import ctc_beam_decoder
    except ImportError:
        pass
    else:
        other = ctc_beam_decoder.build_ctcdecoder(labels, kenlm_model_path=arpa, **kw)
        out["ctc-beam-decoder"] = timed(lambda x: other.decode(x, beam_width=beam), items)
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main()
