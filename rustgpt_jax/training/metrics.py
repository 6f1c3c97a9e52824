"""Run metrics: a CSV file, TensorBoard event files and the architecture summary."""

from __future__ import annotations

import csv
import os


class MetricsWriter:
    """Appends scalar rows to `<run_dir>/metrics.csv` and `<run_dir>/tensorboard/`.

    Each row is (step, split, name, value), so train and validation metrics with
    different keys share one long-format CSV that survives a resume (rows are appended).

    Args:
      run_dir: the run directory.
      tensorboard: also write TensorBoard events (tensorboardX).
    """

    def __init__(self, run_dir: str, tensorboard: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.csv_path = os.path.join(run_dir, 'metrics.csv')
        new = not os.path.exists(self.csv_path)
        self._file = open(self.csv_path, 'a', newline='', encoding='utf-8')
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(['step', 'split', 'name', 'value'])
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, 'tensorboard'))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._csv.writerow([step, split, name, f'{float(value):.6g}'])
            if self._tb is not None:
                self._tb.add_scalar(f'{split}/{name}', float(value), step)
        self._file.flush()

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            # Markdown code block keeps the summary's column alignment in TensorBoard.
            self._tb.add_text(tag, '```\n' + text + '\n```', step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


