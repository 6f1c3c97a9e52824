"""The files of a Hugging Face model directory: config.json, safetensors, tokenizer files.

    config.json                        the model config (`model_type`, sizes, RoPE, ...)
    model.safetensors                  every tensor, or
    model.safetensors.index.json       {"weight_map": {tensor name: shard file}} + shards
    tokenizer.json                     a `tokenizers` tokenizer
    tokenizer_config.json              special tokens, add_bos_token, chat_template

Only file formats live here; the mapping of tensors onto our params is `interop.hf`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import safetensors
import safetensors.numpy

from rustgpt_jax.data.hf_tokenizer import (
    CONFIG_FILE,
    SPECIAL_MAP_FILE,
    TOKENIZER_FILE,
    HFTokenizer,
    to_hf_json,
)

CONFIG_JSON = 'config.json'
WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'


def read_json(path: str) -> dict:
    """A JSON object file; ValueError naming the file when it is missing or not an object."""
    if not os.path.isfile(path):
        raise ValueError(f'{path} does not exist')
    with open(path, encoding='utf-8') as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise ValueError(f'{path}: expected a JSON object')
    return value


def read_state_dict(directory: str) -> dict[str, Any]:
    """name -> array of every tensor, from one safetensors file or an indexed set of shards.

    bfloat16 tensors come back as JAX arrays (numpy has no bfloat16); the others as JAX
    arrays too, one reader for all dtypes. `interop.hf.params_from_hf` takes either.
    """
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(index):
        weight_map = read_json(index).get('weight_map')
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f'{index}: no "weight_map"')
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, WEIGHTS)):
        weight_map, files = None, [WEIGHTS]
    else:
        raise ValueError(f'{directory}: neither {WEIGHTS} nor {WEIGHTS_INDEX} '
                         '(only safetensors weights load)')
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ValueError(f'{index}: shard {name!r} is missing')
        with safetensors.safe_open(path, framework='flax') as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    continue  # listed in another shard (the index decides)
                tensors[key] = f.get_tensor(key)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f'{index}: tensor {missing[0]!r} is not in its shard')
    return tensors


def write_weights(directory: str, state_dict: Mapping[str, np.ndarray]) -> str:
    """Writes `model.safetensors` (one file, float32, metadata format=pt as torch expects)."""
    path = os.path.join(directory, WEIGHTS)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32)
                                 for k, v in state_dict.items()}, path,
                                metadata={'format': 'pt'})
    return path


def write_json(path: str, value: dict) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write('\n')


def read_tokenizer(directory: str) -> Optional[HFTokenizer]:
    """The directory's tokenizer, or None when it has no tokenizer.json."""
    if not os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        return None
    return HFTokenizer.from_directory(directory)


def write_tokenizer(directory: str, tokenizer, chat_template: Optional[str],
                    max_length: int) -> dict:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Args:
      directory: the model directory.
      tokenizer: one of ours (char, word, bpe) or an HFTokenizer.
      chat_template: written as `chat_template` of tokenizer_config.json, or None.
      max_length: `model_max_length` (the model's context).

    Returns:
      the special tokens ({'eos_token': ..., ...}).
    """
    raw, specials = to_hf_json(tokenizer)
    raw.save(os.path.join(directory, TOKENIZER_FILE))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': max_length,
              'add_bos_token': bool(getattr(tokenizer, 'add_bos', False)),
              'add_eos_token': False, 'clean_up_tokenization_spaces': False, **specials}
    if chat_template:
        config['chat_template'] = chat_template
    write_json(os.path.join(directory, CONFIG_FILE), config)
    write_json(os.path.join(directory, SPECIAL_MAP_FILE), specials)
    return specials
