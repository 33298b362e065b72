"""ctclab: Connectionist Temporal Classification on PyTorch — loss, alignment, targets, decoding."""
from ._memory import InsufficientMemoryError
from .align import Alignment, TokenSpan, WordSpan, alignment_posteriors, forced_align, frames_to_seconds, token_spans, word_spans
from .decode import BeamSearchDecoder, Hypothesis, WordTiming, greedy_decode
from .lm import KenLM, NGramLM, load_lm
from .loss import CTCLoss, ctc_loss
from .targets import alignment_targets, state_occupation
from .trellis import NEG, STAR, CTCTrellis
from .vocab import Vocabulary

__all__ = [
    "Alignment",
    "BeamSearchDecoder",
    "CTCLoss",
    "CTCTrellis",
    "Hypothesis",
    "InsufficientMemoryError",
    "KenLM",
    "NEG",
    "NGramLM",
    "STAR",
    "TokenSpan",
    "Vocabulary",
    "WordSpan",
    "WordTiming",
    "alignment_posteriors",
    "alignment_targets",
    "ctc_loss",
    "forced_align",
    "frames_to_seconds",
    "greedy_decode",
    "load_lm",
    "state_occupation",
    "token_spans",
    "word_spans",
]
__version__ = "0.1.0"
