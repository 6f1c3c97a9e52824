"""Data layer: tokenizers, corpora, instruction data, packing and resumable iterators."""

from rustgpt_jax.data.corpus import (
    DEFAULT_VALIDATION_FRACTION,
    load_text,
    shakespeare_files,
    shakespeare_text,
    train_validation_split,
)
from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.instructions import (
    CHAT_TEMPLATE,
    PROMPT_TEMPLATE,
    EncodedExample,
    InstructionExample,
    chat_template_of,
    encode_instruction,
    format_prompt,
    load_instructions,
)
from rustgpt_jax.data.packing import (
    PackedBatchIterator,
    PackedValidationBatches,
    PackingStats,
    build_packed_batch,
    first_fit,
    prepare_examples,
)
from rustgpt_jax.data.pipeline import (
    BATCH_KEYS,
    LMBatchIterator,
    LMValidationBatches,
    ResumableIterator,
)
from rustgpt_jax.data.tokenizers import (
    DEFAULT_KIND,
    TOKENIZER_KINDS,
    ByteBPETokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
        'BATCH_KEYS', 'CHAT_TEMPLATE', 'DEFAULT_KIND', 'DEFAULT_VALIDATION_FRACTION',
        'PROMPT_TEMPLATE', 'TOKENIZER_KINDS', 'ByteBPETokenizer', 'CharTokenizer', 'DataError',
        'EncodedExample', 'HFTokenizer', 'InstructionExample', 'LMBatchIterator',
        'LMValidationBatches', 'PackedBatchIterator', 'PackedValidationBatches', 'PackingStats',
        'ResumableIterator', 'Tokenizer', 'WordTokenizer', 'build_packed_batch',
        'build_tokenizer', 'chat_template_of', 'encode_instruction', 'first_fit',
        'format_prompt', 'load_instructions', 'load_text', 'load_tokenizer', 'prepare_examples',
        'shakespeare_files', 'shakespeare_text', 'train_validation_split',
]
