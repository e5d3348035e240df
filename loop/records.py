"""Where records go: log_history, <output_dir>/metrics.jsonl (one flushed JSON line each), the progress bar, trackers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

from tqdm.auto import tqdm


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # keep the file valid JSON: nan/inf become strings
    return v


class Records:
    def __init__(self, config, accelerator, total_steps: int, start_step: int):
        self.config, self.accelerator = config, accelerator
        self.main = accelerator.is_main_process
        self.file = None
        self.bar = None
        self.trackers = bool(config.report_to) and self.main
        if self.main and not config.disable_tqdm:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _open(self):
        """The records file, opened on first use; None on other processes or with no metrics_file."""
        if self.file is None and self.main and self.config.metrics_file:
            os.makedirs(self.config.output_dir, exist_ok=True)
            self.file = open(os.path.join(self.config.output_dir, self.config.metrics_file), "a", encoding="utf-8")
        return self.file

    def write(self, record: dict, step: int):
        """Append a record to metrics.jsonl and hand it to trackers (main process only)."""
        if not self.main:
            return
        if f := self._open():
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            f.flush()
        if self.trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(scalars, step=step)
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4g}", lr=f"{record.get('learning_rate', 0):.3g}", refresh=False
            )

    def note(self, event: dict):
        """A line in metrics.jsonl that is not a log record (e.g. where a run resumed); it has an `event` key."""
        if f := self._open():
            f.write(json.dumps(event) + "\n")
            f.flush()

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None


class _AboveTheBar:
    """sys.stdout while a progress bar is shown: whole lines go through tqdm.write, which clears the bar, writes the
    line and redraws the bar under it; a print never lands on the bar's own line."""

    def __init__(self, real):
        self.real, self.pending = real, ""

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            tqdm.write(line, file=self.real)
        return len(text)

    def flush(self):
        self.real.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...
        return getattr(self.real, name)


@contextlib.contextmanager
def prints_above_the_bar(shows_bar: bool):
    """For the length of a run that shows a progress bar, a print (a callback's, compute_metrics') goes on its own line
    above the bar. sys.stdout is put back when the run returns or raises."""
    if not shows_bar:
        yield
        return
    real = sys.stdout
    sys.stdout = proxy = _AboveTheBar(real)
    try:
        yield
    finally:
        sys.stdout = real
        if proxy.pending:
            real.write(proxy.pending)
