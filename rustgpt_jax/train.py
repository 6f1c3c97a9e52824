"""Command line: `python -m rustgpt_jax.train --gin_file F.gin [--gin_param B] [--resume]`.

gin configures the edges only: `ModelConfig`, `OptimizerConfig`, `DataConfig` and
`PhaseConfig` are external configurables, and `run_config` below assembles the run.
Layered files: `configs/model/*.gin` (the model), `configs/run/*.gin` (data, phases,
schedule, run directory) and root files that include one of each. A misspelt binding
fails when the files are parsed, before anything is built; a bad value, corpus or mesh
fails before anything is written to the run directory. Either is one line on stderr,
`rustgpt-train: error: <message>`, and exit status 2 (`--traceback` for the stack).

`--init_from PATH` fine-tunes: the model and tokenizer come from PATH (an HF directory,
a .gguf file or a run directory; `training.init_from`), so no model file is needed, and
gin may bind only the ModelConfig fields that keep the parameter shapes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tokenize
from typing import Optional, Sequence

import gin

from rustgpt_jax import cli_errors, sharding
from rustgpt_jax.config import ModelConfig
from rustgpt_jax.training import init_from, loop
from rustgpt_jax.training.optim import OptimizerConfig
from rustgpt_jax.training.run_config import DataConfig, PhaseConfig, RunConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

gin.external_configurable(ModelConfig, 'ModelConfig')
gin.external_configurable(OptimizerConfig, 'OptimizerConfig')
gin.external_configurable(DataConfig, 'DataConfig')
gin.external_configurable(PhaseConfig, 'PhaseConfig')
gin.external_configurable(sharding.MeshConfig, 'MeshConfig')


@gin.configurable
def run_config(model: ModelConfig = gin.REQUIRED, phases: Sequence[PhaseConfig] = gin.REQUIRED,
               run_dir: str = gin.REQUIRED, data: DataConfig = DataConfig(), seed: int = 0,
               checkpoint_every: int = 200, max_to_keep: int = 3, log_every: int = 10,
               time_budget_s: Optional[float] = None, progress: bool = True,
               mesh: Optional[sharding.MeshConfig] = None) -> RunConfig:
    """The run assembled from gin bindings (see `RunConfig` for each field)."""
    return RunConfig(model=model, data=data, phases=tuple(phases), run_dir=run_dir, seed=seed,
                     checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                     log_every=log_every, time_budget_s=time_budget_s, progress=progress,
                     mesh=mesh)


_SEARCH_PATHS: set = set()


def _add_search_path(path: str) -> None:
    """Adds a gin search path once (gin keeps every call's path, even across
    `clear_config`, and lists them all in its file-not-found message)."""
    if path not in _SEARCH_PATHS:
        gin.add_config_file_search_path(path)
        _SEARCH_PATHS.add(path)


class _DropGinPathSearch(logging.Filter):
    """Drops gin's 'Path not found' log lines: it logs one per search path tried, on
    the root logger, before raising an error that names the file anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('Path not found')


@contextlib.contextmanager
def _quiet_gin_search():
    root, quiet = logging.getLogger(), _DropGinPathSearch()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def model_bindings() -> dict:
    """Every parsed gin binding of ModelConfig, in any scope: field -> value."""
    bindings = {}
    # gin has no public listing of scopes; _CONFIG maps (scope, selector) -> bindings.
    for scope, selector in list(gin.config._CONFIG):
        if selector.rsplit('.', 1)[-1] == 'ModelConfig':
            bindings.update(gin.get_bindings(f'{scope}/{selector}' if scope else selector))
    return bindings


def load_run_config(gin_files: Sequence[str], gin_params: Sequence[str] = (),
                    init: Optional[init_from.Pretrained] = None) -> RunConfig:
    """Parses gin files (searched in the working directory, then the repository root)
    and bindings, and returns the run config.

    With `init` (fine-tuning) the model is `init`'s, with the ModelConfig bindings that
    `init_from.model_config` allows; any other binding raises InitFromError naming it.

    Raises:
      ValueError: a misspelt or unknown binding, a missing file, or a bad value (gin's
        message names it).
      SyntaxError: a gin file that does not parse (an unparsable binding is a
        ValueError naming it); RuntimeError: a missing required value.
    """
    gin.clear_config()
    for path in (REPO_ROOT, os.getcwd()):
        _add_search_path(path)
    try:
        with _quiet_gin_search():
            gin.parse_config_files_and_bindings(list(gin_files), list(gin_params))
    except IOError as e:
        raise ValueError(f'gin config file not found: {e}') from None
    except (SyntaxError, tokenize.TokenError) as e:
        binding = _unparsable_binding(gin_params)
        if binding is None:
            raise
        reason = e.msg if isinstance(e, SyntaxError) else e.args[0]
        raise ValueError(f'gin cannot parse the binding {binding!r}: {reason}') from e
    if init is not None:
        return run_config(model=init_from.model_config(init, model_bindings()))
    return run_config()


def _unparsable_binding(gin_params: Sequence[str]) -> Optional[str]:
    """The first binding gin cannot parse on its own, or None. gin parses all bindings
    as one text, and its SyntaxError says neither which binding nor, often, the line."""
    try:
        for binding in gin_params:
            gin.clear_config()
            try:
                gin.parse_config(binding, skip_unknown=True)
            except (SyntaxError, tokenize.TokenError):
                return binding
            except Exception:  # noqa: BLE001 - parsed; any other error is not a syntax one
                pass
        return None
    finally:
        gin.clear_config()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_errors.ArgumentParser(prog='rustgpt-train', description=__doc__.splitlines()[0])
    parser.add_argument('--gin_file', action='append', default=[], required=True,
                        help='gin config file (repeatable; later files override)')
    parser.add_argument('--gin_param', action='append', default=[],
                        help="a gin binding, e.g. \"ModelConfig.num_layers = 4\" (repeatable)")
    parser.add_argument('--resume', action='store_true',
                        help='continue from the latest checkpoint in the run directory')
    parser.add_argument('--init_from', default=None,
                        help='fine-tune from an HF model directory, a .gguf file or a run '
                             'directory (its model config and tokenizer)')
    parser.add_argument('--coordinator_address', default=None,
                        help='multi-host: host:port of process 0 (else RUSTGPT_COORDINATOR, '
                             'else SLURM / TPU auto-detection)')
    parser.add_argument('--num_processes', type=cli_errors.positive_int, default=None,
                        help='multi-host: process count')
    parser.add_argument('--process_id', type=int, default=None, help='multi-host: this process')
    cli_errors.add_traceback_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        with cli_errors.config_errors():
            # Before any other JAX call: the distributed runtime must own device discovery.
            sharding.initialize_distributed(args.coordinator_address, args.num_processes,
                                            args.process_id)
            init = init_from.load_source(args.init_from) if args.init_from else None
            run = load_run_config(args.gin_file, args.gin_param, init)
        # Raises DataError / CheckpointError / ConfigError (user errors by type); anything
        # else from here on is a bug and keeps its traceback.
        prepared = loop.prepare(run, resume=args.resume, init=init)
        result = loop.train(run, resume=args.resume, gin_config=gin.config_str(),
                            prepared=prepared, init=init)
        if result.validation is not None:
            print(f'final step {result.step}: validation loss '
                  f'{result.validation["loss"]:.4f} (perplexity '
                  f'{result.validation["perplexity"]:.2f}); run directory {result.run_dir}')
        return 0

    return cli_errors.run(parser.prog, body, traceback=args.traceback)


if __name__ == '__main__':
    sys.exit(main())
