"""ctclab: Connectionist Temporal Classification on PyTorch — loss, alignment, targets, decoding."""
from .align import Alignment, TokenSpan, WordSpan, alignment_posteriors, forced_align, frames_to_seconds, token_spans, word_spans
from .loss import CTCLoss, ctc_loss
from .targets import alignment_targets, state_occupation
from .trellis import NEG, STAR, CTCTrellis
from .vocab import Vocabulary

__all__ = [
    "Alignment",
    "CTCLoss",
    "CTCTrellis",
    "NEG",
    "STAR",
    "TokenSpan",
    "Vocabulary",
    "WordSpan",
    "alignment_posteriors",
    "alignment_targets",
    "ctc_loss",
    "forced_align",
    "frames_to_seconds",
    "state_occupation",
    "token_spans",
    "word_spans",
]
__version__ = "0.1.0"
