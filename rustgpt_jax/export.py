"""`rustgpt-export`: a trained run as a Hugging Face directory or a GGUF file.

    rustgpt-export --checkpoint RUN_DIR --hf OUT_DIR
    rustgpt-export --checkpoint RUN_DIR --gguf OUT.gguf [--ftype f32|f16|bf16|q8_0|q4_0]

The HF directory loads with `transformers.AutoModelForCausalLM` / `AutoTokenizer`; the
GGUF file runs in llama.cpp. Both carry the run's chat template ('User: ...\\nAssistant: ',
the format instruction tuning here uses), so other tools prompt the model as trained.
A model or tokenizer the target cannot represent is refused with the field named.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax

from rustgpt_jax.interop.gguf import save_gguf
from rustgpt_jax.interop.gguf.writer import FILE_TYPES
from rustgpt_jax.interop.hf import save_pretrained
from rustgpt_jax.training.checkpoint import load_for_inference


def export(checkpoint: str, hf: Optional[str] = None, gguf: Optional[str] = None,
           ftype: str = 'f32', which: str = 'best') -> str:
    """Writes the run's model to `hf` (a directory) or `gguf` (a file); returns the path.

    Raises:
      ValueError: no or both targets, or a model / tokenizer the target cannot hold.
    """
    if (hf is None) == (gguf is None):
        raise ValueError('export needs exactly one of --hf DIR and --gguf FILE')
    config, params, tokenizer = load_for_inference(checkpoint, which=which)
    params = jax.device_get(params)
    if hf is not None:
        return save_pretrained(hf, config, params, tokenizer)
    return save_gguf(gguf, config, params, tokenizer, ftype=ftype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='rustgpt-export', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='run or checkpoints/ directory')
    parser.add_argument('--which', choices=('best', 'latest'), default='best')
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument('--hf', help='write a Hugging Face model directory here')
    target.add_argument('--gguf', help='write a llama-architecture GGUF file here')
    parser.add_argument('--ftype', choices=sorted(FILE_TYPES), default='f32',
                        help='--gguf: type of the 2-D weights (norms stay f32)')
    args = parser.parse_args(argv)
    if args.hf and args.ftype != 'f32':
        parser.error('--ftype applies to --gguf only')
    path = export(args.checkpoint, hf=args.hf, gguf=args.gguf, ftype=args.ftype,
                  which=args.which)
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
