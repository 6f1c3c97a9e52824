"""GGUF import/export (SPEC §6): llama-architecture models and their tokenizers.

`load_gguf(path) -> (config, params, tokenizer)` reads F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q5_K/Q6_K
files (validated before use: hostile files raise `GGUFError`; `validate=True` or
`check_file(path)` also rejects NaN/inf tensor data); with `quantized=True` the weights
stay in their encodings as `quant.QArray` leaves over the memory-mapped file
(`quantized.py`). `save_gguf(path, config, params, tokenizer, ftype=...)` writes a file
llama.cpp runs (a QArray's blocks as they are).
"""

from rustgpt_jax.interop.gguf.dequant import SUPPORTED_TYPES, dequantize
from rustgpt_jax.interop.gguf.loader import load_gguf, permute_qk, unpermute_qk
from rustgpt_jax.interop.gguf.reader import GGUFError, read_header
from rustgpt_jax.interop.gguf.tokenizer import GGUFTokenizer
from rustgpt_jax.interop.gguf.validate import check_file
from rustgpt_jax.interop.gguf.writer import check_llama_compatible, save_gguf

__all__ = ['GGUFError', 'GGUFTokenizer', 'SUPPORTED_TYPES', 'check_file',
           'check_llama_compatible', 'dequantize', 'load_gguf', 'permute_qk', 'read_header',
           'save_gguf', 'unpermute_qk']
