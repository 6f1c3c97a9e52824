"""Result plots with matplotlib's Agg backend (files only, no display).

`plot_loss_curves` draws validation (solid) and training (faint) loss against the step
from each run's metrics.csv; `plot_bars` draws one bar per variant with the seed
standard deviation as the error bar.
"""

from __future__ import annotations

import csv
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def read_metrics(run_dir: str) -> dict:
    """{(split, name): [(step, value), ...]} from `run_dir/metrics.csv`, in file order."""
    series: dict = {}
    with open(os.path.join(run_dir, 'metrics.csv'), newline='', encoding='utf-8') as f:
        for row in csv.DictReader(f):
            series.setdefault((row['split'], row['name']), []).append(
                (int(row['step']), float(row['value'])))
    return series


def plot_loss_curves(rows: Sequence[dict], path: str, title: str = '') -> Optional[str]:
    """Loss curves of the runs in `rows` (results rows with a `run_dir`).

    Runs whose metrics.csv is gone (e.g. results copied without run directories) are
    skipped; returns None when none is left, else the PNG path.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours, labelled = {}, set()
    drawn, val_values = 0, []
    for row in rows:
        metrics_path = os.path.join(row['run_dir'], 'metrics.csv')
        if not os.path.exists(metrics_path):
            continue
        series = read_metrics(row['run_dir'])
        colour = colours.setdefault(row['variant'], f'C{len(colours) % 10}')
        train = series.get(('train', 'loss'), [])
        val = series.get(('val', 'loss'), [])
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.25, linewidth=0.8)
        if val:
            label = None if row['variant'] in labelled else row['variant']  # once per variant
            labelled.add(row['variant'])
            ax.plot(*zip(*val), color=colour, marker='o', markersize=3, label=label)
            val_values += [v for _, v in val]
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if val_values:
        # Early training losses (first steps of an unwarmed run) can be several times the
        # validation losses; clip to the validation range so the comparison stays legible.
        low, high = min(val_values), max(val_values)
        pad = max(0.1 * (high - low), 0.05)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats/token)')
    ax.set_title(f'{title}: validation (markers) and training (faint) loss')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(table: Sequence[dict], path: str, title: str = '',
              key: str = 'best_val_loss') -> str:
    """Bars of `key` per variant with +- one sample std error bars.

    Args:
      table: `runner.aggregate` entries ({'variant', key: (mean, std), 'n'}).
      path: the PNG to write.
    """
    names = [e['variant'] for e in table]
    means = [e[key][0] for e in table]
    stds = [e[key][1] for e in table]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4,
           color=[f'C{i % 10}' for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, rotation=25, ha='right')
    low = min(m - s for m, s in zip(means, stds))
    high = max(m + s for m, s in zip(means, stds))
    pad = max(0.05 * (high - low), 0.01)
    ax.set_ylim(low - 4 * pad, high + pad)  # losses differ by little; zoom on them
    ax.set_ylabel(key.replace('_', ' '))
    seeds = sorted({e['n'] for e in table})
    ax.set_title(f'{title} (mean +- std over {"/".join(map(str, seeds))} seed(s))')
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
