"""loop: a hand-written Accelerator training loop with Trainer's knobs and Trainer's numbers."""

from .callbacks import Callback, EarlyStopping
from .config import TrainConfig
from .errors import LoopError
from .evaluation import evaluate, predict
from .fit import TrainResult, train
from .preempt import Preempted
from .trainer import Trainer

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "predict",
    "TrainResult",
    "Callback",
    "EarlyStopping",
    "LoopError",
    "Preempted",
    "Trainer",
]
__version__ = "0.1.0"
