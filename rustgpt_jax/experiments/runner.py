"""Command line: `python -m rustgpt_jax.experiments.runner experiments/X.gin [--seeds 0 1]`.

An experiment file is a root gin file (it includes a model and a run file) plus the
bindings of `experiment`: a name and named variants, each a list of gin bindings layered
over the includes. The runner trains every variant x seed, appends one row per run to
the results CSV, then rewrites the aggregate markdown table (mean +- std over seeds) and
the plots of that experiment next to it.

Every run's configuration is loaded and checked (`loop.prepare`) before the first run
trains, so a bad variant fails in seconds rather than after the variants before it; a
user error is one line, `rustgpt-experiment: error: <message>`, exit status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import gin

from rustgpt_jax import cli_errors
from rustgpt_jax import train as train_cli
from rustgpt_jax.experiments import plots
from rustgpt_jax.experiments.plots import read_metrics
from rustgpt_jax.training import loop
from rustgpt_jax.training.run_config import RunConfig
from rustgpt_jax.training.state import count_params

RESULTS_COLUMNS = ('experiment', 'variant', 'seed', 'best_val_loss', 'final_val_loss',
                   'final_step', 'tokens_per_s', 'wall_s', 'num_params', 'stopped_early',
                   'bindings', 'run_dir', 'finished_at')


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What an experiment file declares.

    Attributes:
      name: the experiment's name (the `experiment` column of the results).
      variants: {variant name: tuple of gin bindings}, in file order.
      seeds: default seeds (the command line may override them).
      time_budget_s: default wall-clock budget of each run (None: the run file's).
    """
    name: str
    variants: dict
    seeds: tuple = (0,)
    time_budget_s: Optional[float] = None


@gin.configurable
def experiment(name: str = gin.REQUIRED, variants: dict = gin.REQUIRED,
               seeds: Sequence[int] = (0,), time_budget_s: Optional[float] = None) -> Experiment:
    """The experiment declared by gin bindings (see `Experiment`).

    Raises:
      ValueError: no variants, or a variant whose bindings are not a list of strings.
    """
    if not variants:
        raise ValueError('experiment.variants is empty; name at least one variant')
    clean = {}
    for key, bindings in variants.items():
        if isinstance(bindings, str) or not all(isinstance(b, str) for b in bindings):
            raise ValueError(f'experiment.variants[{key!r}] must be a list of gin binding '
                             f'strings, got {bindings!r}')
        clean[str(key)] = tuple(bindings)
    return Experiment(name=name, variants=clean, seeds=tuple(int(s) for s in seeds),
                      time_budget_s=time_budget_s)


def load_experiment(path: str, gin_params: Sequence[str] = ()) -> Experiment:
    """Parses an experiment file (checking that its base run config loads) and returns it."""
    train_cli.load_run_config([path], gin_params)
    return experiment()


def summarize_run(result: loop.TrainResult, wall_s: float) -> dict:
    """The metric columns of one run's results row.

    best_val_loss is the lowest evaluation in metrics.csv; final_val_loss the last one
    (`result.validation`); tokens_per_s the median of the logged training throughputs,
    which keeps the first interval's compilation out of the number.
    """
    series = read_metrics(result.run_dir)
    val = [v for _, v in series.get(('val', 'loss'), [])]
    throughput = [v for _, v in series.get(('train', 'tokens_per_s'), [])]
    if not val or result.validation is None:
        raise ValueError(f'{result.run_dir} has no validation loss; the run ended before its '
                         'first evaluation (raise the budget or lower checkpoint_every)')
    return dict(best_val_loss=min(val), final_val_loss=float(result.validation['loss']),
                final_step=result.step,
                tokens_per_s=statistics.median(throughput) if throughput else float('nan'),
                wall_s=wall_s, num_params=count_params(result.state.params),
                stopped_early=result.stopped_early)


def append_rows(path: str, rows: Sequence[dict]) -> None:
    """Appends rows (dicts over RESULTS_COLUMNS) to the CSV at `path`, header if new."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=RESULTS_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in RESULTS_COLUMNS})


def read_results(path: str) -> list[dict]:
    """The rows of a results CSV with numeric columns converted."""
    rows = []
    with open(path, newline='', encoding='utf-8') as f:
        for row in csv.DictReader(f):
            for key in ('best_val_loss', 'final_val_loss', 'tokens_per_s', 'wall_s'):
                row[key] = float(row[key])
            for key in ('seed', 'final_step', 'num_params'):
                row[key] = int(row[key])
            rows.append(row)
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Sequence[dict], name: str) -> list[dict]:
    """Per-variant aggregates of experiment `name`, variants in first-seen order."""
    groups: dict = {}
    for row in rows:
        if row['experiment'] == name:
            groups.setdefault(row['variant'], []).append(row)
    table = []
    for variant, group in groups.items():
        entry = {'variant': variant, 'n': len(group), 'num_params': group[-1]['num_params']}
        for key in ('best_val_loss', 'final_val_loss', 'tokens_per_s', 'wall_s', 'final_step'):
            entry[key] = mean_std([float(r[key]) for r in group])
        table.append(entry)
    return table


def markdown_table(rows: Sequence[dict], name: str) -> str:
    """The aggregate table of experiment `name` as markdown (mean +- std over seeds)."""
    lines = [f'### {name}', '',
             '| variant | seeds | params | best val loss | final val loss | steps | tokens/s '
             '| wall s |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for e in aggregate(rows, name):
        fmt = lambda key, p: f'{e[key][0]:.{p}f} +- {e[key][1]:.{p}f}'  # noqa: E731
        lines.append(f'| {e["variant"]} | {e["n"]} | {e["num_params"]:,} | '
                     f'{fmt("best_val_loss", 4)} | {fmt("final_val_loss", 4)} | '
                     f'{fmt("final_step", 0)} | {fmt("tokens_per_s", 0)} | {fmt("wall_s", 1)} |')
    return '\n'.join(lines) + '\n'


def write_summary(results_csv: str) -> str:
    """Rewrites `<results>.md` (every experiment's table) and each experiment's plots.

    Returns:
      the markdown path.
    """
    rows = read_results(results_csv)
    names = list(dict.fromkeys(r['experiment'] for r in rows))
    out_dir = os.path.dirname(os.path.abspath(results_csv))
    md_path = os.path.splitext(results_csv)[0] + '.md'
    parts = ['# Experiment results', '',
             f'Aggregated from `{os.path.basename(results_csv)}`: mean +- sample std over '
             'seeds. Plots: `<experiment>_curves.png`, `<experiment>_bars.png`.', '']
    for name in names:
        parts.append(markdown_table(rows, name))
        group = [r for r in rows if r['experiment'] == name]
        plots.plot_loss_curves(group, os.path.join(out_dir, f'{name}_curves.png'), title=name)
        plots.plot_bars(aggregate(rows, name), os.path.join(out_dir, f'{name}_bars.png'),
                        title=name)
    with open(md_path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts))
    return md_path


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One variant x seed of an experiment, its configuration already checked."""
    variant: str
    seed: int
    run: RunConfig
    gin_config: str


def plan_runs(path: str, seeds: Optional[Sequence[int]] = None,
              gin_params: Sequence[str] = (), budget_s: Optional[float] = None,
              runs_dir: str = 'runs/experiments', variants: Optional[Sequence[str]] = None,
              ) -> tuple[Experiment, list[PlannedRun]]:
    """Loads and checks every selected variant x seed of an experiment; trains nothing.

    Each run's bindings are the variant's, then `gin_params`, then the seed, run
    directory and budget; its run directory is `runs_dir/<name>/<stamp>/<variant>/seed<k>`.
    Each distinct data / phase / mesh setting is checked with `loop.prepare` (corpus,
    tokenizer, splits, mesh) once.

    Raises:
      ValueError: an unknown variant name, a bad binding or value (naming it), or bad data.
    """
    spec = load_experiment(path, gin_params)
    chosen = list(spec.variants) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in spec.variants]
    if unknown:
        raise ValueError(f'unknown variant(s) {unknown} in {path}; it has {list(spec.variants)}')
    seeds = spec.seeds if seeds is None else tuple(seeds)
    budget = spec.time_budget_s if budget_s is None else budget_s
    if budget is not None and not budget > 0:
        raise ValueError(f'the time budget must be > 0 seconds, got {budget}')
    stamp = time.strftime('%Y%m%d-%H%M%S')
    planned, checked = [], set()
    for variant in chosen:
        for seed in seeds:
            run_dir = os.path.join(runs_dir, spec.name, stamp, variant, f'seed{seed}')
            bindings = list(spec.variants[variant]) + list(gin_params) + [
                f'run_config.seed = {seed}', f"run_config.run_dir = '{run_dir}'",
                'run_config.progress = False']
            if budget is not None:
                bindings.append(f'run_config.time_budget_s = {float(budget)}')
            try:
                run = train_cli.load_run_config([path], bindings)
            except (ValueError, TypeError) as e:
                raise ValueError(f'variant {variant!r}: {cli_errors.one_line(e)}') from e
            key = repr((run.data, run.phases, run.model.vocab_size, run.mesh))
            if key not in checked:
                loop.prepare(run)
                checked.add(key)
            planned.append(PlannedRun(variant, seed, run, gin.config_str()))
    return spec, planned


def train_planned(spec: Experiment, planned: Sequence[PlannedRun], gin_params: Sequence[str],
                  results: str, log: Callable[[str], None] = print) -> list[dict]:
    """Trains the planned runs in order, appending each one's row; then the summary."""
    rows = []
    for p in planned:
        log(f'[{spec.name}] {p.variant} seed {p.seed}: {p.run.run_dir}')
        t0 = time.perf_counter()
        result = loop.train(p.run, gin_config=p.gin_config, log=lambda _: None)
        row = dict(experiment=spec.name, variant=p.variant, seed=p.seed,
                   bindings='; '.join(spec.variants[p.variant] + tuple(gin_params)),
                   run_dir=p.run.run_dir, finished_at=time.strftime('%Y-%m-%dT%H:%M:%S'),
                   **summarize_run(result, time.perf_counter() - t0))
        log(f'  step {row["final_step"]}: best val {row["best_val_loss"]:.4f}, final '
            f'{row["final_val_loss"]:.4f}, {row["tokens_per_s"]:,.0f} tok/s, '
            f'{row["num_params"]:,} params, {row["wall_s"]:.1f} s')
        append_rows(results, [row])
        rows.append(row)
    write_summary(results)
    return rows


def run_experiment(path: str, seeds: Optional[Sequence[int]] = None,
                   gin_params: Sequence[str] = (), budget_s: Optional[float] = None,
                   results: str = 'experiments/results/results.csv',
                   runs_dir: str = 'runs/experiments', variants: Optional[Sequence[str]] = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Trains every selected variant x seed of the experiment file and appends the rows
    (`plan_runs` checks them all first; see it for the bindings and run directories).

    Returns:
      the rows appended (dicts over RESULTS_COLUMNS).

    Raises:
      ValueError: from `plan_runs`, before any run trains.
    """
    spec, planned = plan_runs(path, seeds, gin_params, budget_s, runs_dir, variants)
    return train_planned(spec, planned, gin_params, results, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_errors.ArgumentParser(prog='rustgpt-experiment',
                                       description=__doc__.splitlines()[0])
    parser.add_argument('experiment_file', help='gin experiment file (includes + experiment.*)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help='seeds (default: experiment.seeds)')
    parser.add_argument('--variants', nargs='+', default=None, help='run only these variants')
    parser.add_argument('--gin_param', action='append', default=[],
                        help='extra binding applied to every run (repeatable)')
    parser.add_argument('--budget_s', type=float, default=None,
                        help='wall-clock budget per run (default: experiment.time_budget_s)')
    parser.add_argument('--results', default='experiments/results/results.csv',
                        help='results CSV to append to (markdown and plots go beside it)')
    parser.add_argument('--runs_dir', default='runs/experiments', help='root of run directories')
    cli_errors.add_traceback_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        with cli_errors.config_errors():
            if not os.path.isfile(args.experiment_file):
                raise ValueError(f'experiment file not found: {args.experiment_file}')
            spec, planned = plan_runs(args.experiment_file, args.seeds, args.gin_param,
                                      args.budget_s, args.runs_dir, args.variants)
        rows = train_planned(spec, planned, args.gin_param, args.results)
        bad = [r for r in rows if not math.isfinite(r['final_val_loss'])]
        return 1 if bad else 0

    return cli_errors.run(parser.prog, body, traceback=args.traceback)


if __name__ == '__main__':
    sys.exit(main())
