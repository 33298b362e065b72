"""Runs pyctcdecode on saved log-probs (own interpreter: pyctcdecode pins numpy < 2)."""
import json
import sys
import time

import numpy as np


def main():
    from pyctcdecode import build_ctcdecoder

    data_path, arpa, config_path, out_path = sys.argv[1:5]
    config = json.load(open(config_path))
    data = np.load(data_path)
    labels = config["labels"]
    decoder = build_ctcdecoder(labels, kenlm_model_path=arpa if arpa != "-" else None, alpha=config["alpha"], beta=config["beta"])
    texts, times = [], []
    for i in range(data["log_probs"].shape[0]):
        lp = data["log_probs"][i][: data["lengths"][i]]
        t0 = time.perf_counter()
        texts.append(decoder.decode(lp, beam_width=config["beam_width"]))
        times.append(time.perf_counter() - t0)
    json.dump({"texts": texts, "seconds": sum(times)}, open(out_path, "w"))


if __name__ == "__main__":
    main()
