"""ctclab: Connectionist Temporal Classification on PyTorch — loss, alignment, targets, decoding."""
from .loss import CTCLoss, ctc_loss
from .trellis import NEG, CTCTrellis

__all__ = ["CTCLoss", "CTCTrellis", "NEG", "ctc_loss"]
__version__ = "0.1.0"
