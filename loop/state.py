"""All progress of a run in one object, saved and loaded symmetrically (as litgpt/Fabric do)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class TrainState:
    global_step: int = 0  # optimizer steps taken
    epoch: float = 0.0  # fractional epoch, as Trainer logs it
    epoch_index: int = 0  # the epoch being trained
    batches_in_epoch: int = 0  # micro-batches this rank consumed in epoch_index
    max_steps: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    best_metric: float | None = None
    best_global_step: int | None = None
    best_checkpoint: str | None = None
    last_logged_step: int = 0  # global_step of the last loss record (loss is averaged since then)
    total_loss: float = 0.0  # sum of logged losses, for the final train_loss
    loss_counted_from: int = 0  # the step total_loss counts from (a Trainer checkpoint's: it saves no running loss)
    patience_counter: int = 0  # evaluations without improvement (early stopping)
    log_history: list = field(default_factory=list)
    callback_states: dict = field(default_factory=dict)
    # what the data position means; a resume with other values cannot be exact
    geometry: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
