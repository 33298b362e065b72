"""The README's Python examples run as written."""
import re
from pathlib import Path

import torch

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_training_step_example_runs_and_learns():
    namespace: dict = {}
    exec(BLOCKS[0], namespace)
    assert torch.isfinite(namespace["loss"])


def test_alignment_and_modification_examples_run():
    import ctclab

    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(30, 2, 6, generator=g).log_softmax(-1).requires_grad_(True)
    targets, il, tl = torch.tensor([[1, 2, 1], [3, 4, 5]]), torch.tensor([30, 25]), torch.tensor([3, 2])
    namespace = dict(ctclab=ctclab, log_probs=log_probs, targets=targets, input_lengths=il, target_lengths=tl,
                     il=il, tl=tl, vocab=ctclab.Vocabulary(("<b>", "|", "a", "b", "c", "d")))
    exec(BLOCKS[1], namespace)
    assert namespace["words"] and namespace["spans"][0][0].confidence is not None
    exec(BLOCKS[2], namespace)
    namespace["loss"].backward()
    assert torch.isfinite(log_probs.grad).all()


def test_decoding_example_runs():
    import ctclab

    g = torch.Generator().manual_seed(0)
    log_probs = (3 * torch.randn(30, 2, 6, generator=g)).log_softmax(-1)
    namespace = dict(log_probs=log_probs, input_lengths=torch.tensor([30, 22]), lm=None,
                     vocab=ctclab.Vocabulary(("<b>", "|", "a", "b", "c", "d")))
    exec(BLOCKS[3], namespace)
    assert len(namespace["best_paths"]) == 2 and len(namespace["hyps"][0]) == 3
    assert namespace["text"] == namespace["hyps"][0][0].text
