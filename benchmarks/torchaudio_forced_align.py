"""Worker for ``python -m ctclab.examples.speech eval --torchaudio-python PY``: torchaudio's
``forced_align`` on saved emissions, one utterance at a time (its batch size is 1), in an
interpreter that has torchaudio (see align_vs_torchaudio.py for setting one up).

Usage: PY benchmarks/torchaudio_forced_align.py IN.npz OUT.npz
IN holds ``count`` and, for each i, ``lp{i}`` (T, C) float32 log-probs and ``tg{i}`` (L,) int32
targets (blank = 0); OUT gets ``labels{i}`` (T,) int64, the frame labels of the best path, and
``score{i}``, its summed log-prob.
"""
import sys
import warnings

import numpy as np
import torch
from torchaudio.functional import forced_align


def main():
    source, target = sys.argv[1], sys.argv[2]
    data = np.load(source)
    warnings.filterwarnings("ignore", category=UserWarning)  # torchaudio 2.9's deprecation notice
    out = {}
    for i in range(int(data["count"])):
        emission = torch.from_numpy(data[f"lp{i}"])[None]
        targets = torch.from_numpy(data[f"tg{i}"]).int()[None]
        labels, scores = forced_align(emission, targets, blank=0)
        out[f"labels{i}"] = labels[0].numpy().astype(np.int64)
        out[f"score{i}"] = np.float64(scores[0].double().sum())
    np.savez(target, **out)


if __name__ == "__main__":
    main()
