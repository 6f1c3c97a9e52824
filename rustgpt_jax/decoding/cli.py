"""`rustgpt-generate` and `rustgpt-chat`: thin command lines over a saved checkpoint.

Prompt rules (never a crash; every adjustment is reported on stderr):
  * characters the tokenizer cannot encode: a tokenizer with an `<unk>` id maps them to
    it (reported with a count); one that refuses them raises, and the CLI prints the
    tokenizer's message as `prog: error: ...` and exits with status 2 (the chat asks
    again);
  * an empty prompt starts from BOS, else from EOS (the document separator the model
    saw in training), else it is an error;
  * a model with its own chat template (a GGUF file's `tokenizer.chat_template`, an HF
    directory's `chat_template`): `rustgpt-chat` renders the whole conversation with it
    (decoding.chat_template, as transformers' apply_chat_template), parses the special
    tokens it writes, puts BOS first when the tokenizer adds one and the template did not
    (as llama.cpp does), and ends an answer at the template's end-of-turn token. Runs
    trained here keep 'User: ...\nAssistant: ', one turn at a time, as they were trained;
  * too long for a model with a fixed context (full causal or learned positions,
    `cache.context_limit`): max_new_tokens is capped at context - 1 and the prompt is
    cut from the left to the newest context - max_new_tokens tokens. A sliding-window
    RoPE model has no limit (its cache is a ring buffer).

Bad flags, a missing or foreign checkpoint and a malformed GGUF file are one line on
stderr, `prog: error: <message>`, and exit status 2 (`--traceback` shows the stack);
flags are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional, Sequence, TextIO

import jax

from rustgpt_jax import cli_errors
from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.instructions import format_prompt
from rustgpt_jax.decoding.beam import BeamConfig, beam_search
from rustgpt_jax.decoding.cache import context_limit, prepare_for_decode
from rustgpt_jax.decoding.chat_template import ChatFormat, end_of_turn_id, special_tokens_of
from rustgpt_jax.decoding.sampling import SamplingConfig
from rustgpt_jax.decoding.streaming import TextStreamer, stream, truncate_at_stop
from rustgpt_jax.decoding.wakeup import cpu_wakeup_latency
from rustgpt_jax.interop.gguf import load_gguf
from rustgpt_jax.interop.hf import load_pretrained
from rustgpt_jax.native import cpu_gemv
from rustgpt_jax.training.checkpoint import load_for_inference

CHAT_STOP = ('\nUser:',)  # a chat answer ends where the model starts the next turn


def load_checkpoint(directory: str, which: str = 'best'):
    """(config, params, tokenizer) of a saved run (the training package's loader)."""
    return load_for_inference(directory, which=which)


def load_gguf_model(path: str, context: Optional[int] = None, quantized: bool = True):
    """(config, params, tokenizer) of a llama GGUF file; `context` sizes the KV cache.

    Weights stay in their encodings (`quant.QArray`) unless `quantized` is False, which
    dequantises them to float32 as `--dequantize` asks.
    """
    return load_gguf(path, max_seq_len=context, quantized=quantized)


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache (under the kernel cache directory,
    `native.cpu_gemv.cache_dir()`), so a second run of a CLI does not compile its steps
    again. A cache directory the user configured (JAX_COMPILATION_CACHE_DIR) wins."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update('jax_compilation_cache_dir', str(cpu_gemv.cache_dir() / 'jax'))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _load(args):
    """The model the flags name: --gguf FILE, --hf DIR or --checkpoint DIR."""
    if args.dequantize and not args.gguf:
        raise cli_errors.UserError('--dequantize applies to --gguf files only')
    if args.gguf:
        return load_gguf_model(args.gguf, args.context, quantized=not args.dequantize)
    if args.hf:
        return load_pretrained(args.hf, **({} if args.context is None else
                                           {'max_seq_len': args.context}))
    return load_checkpoint(args.checkpoint, args.which)


def _session(args, err: TextIO) -> 'Session':
    """The Session of the flags' model; pretrained models put BOS first as trained."""
    enable_compilation_cache()
    config, params, tokenizer = _load(args)
    add_bos = bool(args.gguf) or bool(args.hf and tokenizer.add_bos)
    return Session(config, params, tokenizer, err=err, add_bos=add_bos)


class Session:
    """A loaded model ready to generate: the model, params, tokenizer and context limit.

    The model is put in its decode form (`cache.prepare_for_decode`: unrolled layers,
    packed projections): faster per token on CPU, the same function.
    """

    def __init__(self, config, params, tokenizer, err: TextIO = sys.stderr,
                 add_bos: bool = False):
        self.add_bos = add_bos and tokenizer.bos_id is not None
        decode_form = prepare_for_decode(config, params)
        self.config, self.params = decode_form.config, decode_form.params
        self.model = decode_form.model
        self.tokenizer = tokenizer
        self.limit = context_limit(self.config)
        self.err = err

    def encode(self, text: str, max_new_tokens: int,
               special: bool = False) -> tuple[list[int], int]:
        """Prompt ids and the max_new_tokens that fit (see the module docstring).

        `special`: parse special tokens written in the text (a rendered chat template).
        """
        tok = self.tokenizer
        ids = [int(i) for i in (tok.encode(text, special=True) if special else tok.encode(text))]
        if self.add_bos and text and not (special and ids[:1] == [tok.bos_id]):
            ids = [int(tok.bos_id)] + ids  # llama models were trained with BOS first
        unknown = sum(i == tok.unk_id for i in ids) if tok.unk_id is not None else 0
        if unknown:
            self._note(f'{unknown} character(s) of the prompt are not in the vocabulary and '
                       f'were replaced by <unk>')
        if not ids:
            start = tok.bos_id if tok.bos_id is not None else tok.eos_id
            if start is None:
                raise DataError('the prompt is empty and the tokenizer has no BOS or EOS '
                                 'token to start from')
            ids = [int(start)]
        if self.limit is not None:
            if max_new_tokens > self.limit - 1:
                self._note(f'max_new_tokens {max_new_tokens} capped at {self.limit - 1} '
                           f'(context {self.limit})')
                max_new_tokens = self.limit - 1
            keep = self.limit - max_new_tokens
            if len(ids) > keep:
                self._note(f'prompt of {len(ids)} tokens cut to its last {keep} (context '
                           f'{self.limit} = prompt + max_new_tokens {max_new_tokens})')
                ids = ids[-keep:]
        return ids, max_new_tokens

    def stream_text(self, text: str, *, max_new_tokens: int, sampling: SamplingConfig,
                    seed: int, stop: Sequence[str], out: TextIO, special: bool = False,
                    stop_ids: Sequence[int] = ()) -> str:
        """Streams the continuation of `text` to `out`; returns it.

        `special` as in `encode`; generation also ends after any id in `stop_ids` (a chat
        template's end-of-turn token).
        """
        ids, max_new_tokens = self.encode(text, max_new_tokens, special)
        streamer = TextStreamer(self.tokenizer, stop)
        for token in stream(self.model, self.params, ids, max_new_tokens=max_new_tokens,
                            sampling=sampling, eos_id=self.tokenizer.eos_id,
                            rng=jax.random.key(seed), limit=self.limit):
            out.write(streamer.push(token))
            out.flush()
            if streamer.stopped or token in stop_ids:
                break
        out.write(streamer.flush())
        out.flush()
        return streamer.text

    def beam_text(self, text: str, *, max_new_tokens: int, config: BeamConfig,
                  stop: Sequence[str]) -> tuple[str, list[int]]:
        """Best beam-search continuation and the width trajectory."""
        ids, max_new_tokens = self.encode(text, max_new_tokens)
        result = beam_search(self.model, self.params, ids, max_new_tokens=max_new_tokens,
                             config=config, eos_id=self.tokenizer.eos_id,
                             pad_id=self.tokenizer.pad_id, limit=self.limit)
        text, _ = truncate_at_stop(self.tokenizer.decode(result.best), stop)
        return text, result.widths.tolist()

    def _note(self, message: str) -> None:
        print(f'[note] {message}', file=self.err)


def _common_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='run or checkpoints/ directory')
    source.add_argument('--gguf', help='a llama-architecture GGUF file (e.g. TinyLlama)')
    source.add_argument('--hf', help='a Hugging Face Llama/Mistral model directory')
    parser.add_argument('--which', choices=('best', 'latest'), default='best')
    parser.add_argument('--dequantize', action='store_true',
                        help='--gguf: dequantise the weights to float32 instead of running '
                             'them in their GGUF encodings (Q8_0, Q4_K, ...)')
    parser.add_argument('--context', type=cli_errors.positive_int, default=None,
                        help='--gguf / --hf: context length / KV-cache size (default: the '
                             "model's)")
    parser.add_argument('--max_new_tokens', type=cli_errors.positive_int, default=200)
    parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy')
    parser.add_argument('--top_k', type=int, default=0, help='0 = off')
    parser.add_argument('--top_p', type=float, default=1.0, help='1 = off')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--stop', action='append', default=[],
                        help='stop string (repeatable); generation ends before it')
    parser.add_argument('--wakeup_latency_us', type=int, default=None,
                        help='hold a CPU idle wake-up latency request while running '
                             '(Linux PM QoS, needs root; 0 = idle CPUs poll): faster '
                             'CPU decoding on VMs, more idle power. See decoding.wakeup')
    cli_errors.add_traceback_flag(parser)


def _wakeup(args, err: TextIO) -> contextlib.ExitStack:
    """Holds the --wakeup_latency_us request until the returned stack closes; if it cannot
    be made, a note on `err` and the command runs without it (a bad value: ValueError)."""
    stack = contextlib.ExitStack()
    if args.wakeup_latency_us is not None:
        try:
            stack.enter_context(cpu_wakeup_latency(args.wakeup_latency_us, required=True))
        except OSError as e:
            print(f'[note] {e.strerror}; running at the default latency', file=err)
    return stack


def _sampling(args) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def generate_main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
                  err: TextIO = sys.stderr) -> int:
    """`rustgpt-generate`: continue a prompt (streamed), or beam search with --beam."""
    parser = cli_errors.ArgumentParser(prog='rustgpt-generate', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_args(parser)
    parser.add_argument('--prompt', required=True)
    parser.add_argument('--beam', action='store_true', help='adaptive-width beam search')
    parser.add_argument('--beam_width', type=int, default=4, help='starting width')
    parser.add_argument('--min_width', type=int, default=1)
    parser.add_argument('--max_width', type=int, default=8)
    parser.add_argument('--fixed_width', action='store_true', help='no width adaptation')
    parser.add_argument('--alpha', type=float, default=1.0, help='length normalisation')
    args = parser.parse_args(argv)

    def body() -> int:
        with cli_errors.config_errors():  # every flag checked before the model loads
            sampling = _sampling(args)
            beam = BeamConfig(width=args.beam_width, min_width=args.min_width,
                              max_width=args.max_width, alpha=args.alpha,
                              adaptive=not args.fixed_width) if args.beam else None
            wakeup = _wakeup(args, err)
        with wakeup:
            session = _session(args, err)
            if beam is not None:
                text, widths = session.beam_text(args.prompt, max_new_tokens=args.max_new_tokens,
                                                 config=beam, stop=args.stop)
                out.write(text + '\n')
                print(f'[beam widths] {widths}', file=err)
            else:
                session.stream_text(args.prompt, max_new_tokens=args.max_new_tokens,
                                    sampling=sampling, seed=args.seed, stop=args.stop, out=out)
                out.write('\n')
        return 0

    return cli_errors.run(parser.prog, body, traceback=args.traceback, err=err)


def chat_main(argv: Optional[Sequence[str]] = None, stdin: TextIO = sys.stdin,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`rustgpt-chat`: a REPL; each line is answered (streamed); `exit` or EOF quits."""
    parser = cli_errors.ArgumentParser(prog='rustgpt-chat', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_args(parser)
    parser.add_argument('--template', choices=('auto', 'model', 'chat', 'plain'), default='auto',
                        help="model: the model's own chat template over the whole conversation; "
                             "chat: 'User: ...\\nAssistant: ' (instruction-tuned runs); plain: "
                             'continue the text as typed; auto: model when it has one, else chat')
    parser.add_argument('--system', default=None,
                        help='a system message (for a chat template with a system role)')
    args = parser.parse_args(argv)

    def body() -> int:
        with cli_errors.config_errors():
            sampling = _sampling(args)
            wakeup = _wakeup(args, err)
        with wakeup:
            session = _session(args, err)
            with cli_errors.config_errors():  # --template / --system against the model
                chat = _chat_format(args, session.tokenizer)
            _chat_loop(session, chat, args, sampling, stdin, out, err)
        return 0

    return cli_errors.run(parser.prog, body, traceback=args.traceback, err=err)


def _chat_format(args, tokenizer) -> Optional[ChatFormat]:
    """The model's chat template under --template auto/model, else None; checks --system."""
    template = getattr(tokenizer, 'chat_template', None)
    if args.template == 'model' and not template:
        raise ValueError('--template model: this model has no chat template (use chat or plain)')
    if args.template in ('chat', 'plain') or not template:
        if args.system is not None:
            raise ValueError('--system needs a chat template with a system role; the '
                             f"{'plain' if args.template == 'plain' else 'chat'} format has none")
        return None
    chat = ChatFormat(template, special_tokens_of(tokenizer))
    if args.system is not None and not chat.supports_system():
        raise ValueError("--system: this model's chat template has no system role")
    return chat


def _chat_loop(session: Session, chat: Optional[ChatFormat], args, sampling: SamplingConfig,
               stdin: TextIO, out: TextIO, err: TextIO) -> None:
    own_format = chat is None and args.template != 'plain'
    stop = list(args.stop) + (list(CHAT_STOP) if own_format else [])
    messages, stop_ids = [], ()
    if chat is not None:
        messages = [{'role': 'system', 'content': args.system}] if args.system else []
        eot = end_of_turn_id(chat, session.tokenizer)
        stop_ids = tuple(i for i in (eot, session.tokenizer.eos_id) if i is not None)
    out.write("Type a message; 'exit' quits.\n")
    for turn in range(1 << 30):
        out.write('User: ')
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ('exit', 'quit'):
            break
        text = line.rstrip('\n')
        out.write('Assistant: ')
        try:
            if chat is not None:  # the whole conversation, rendered by the model's template
                prompt = chat.render(messages + [{'role': 'user', 'content': text}])
            else:
                prompt = format_prompt(text) if own_format else text
            answer = session.stream_text(
                prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                seed=args.seed + turn, stop=stop, out=out, special=chat is not None,
                stop_ids=stop_ids)
            if chat is not None:
                messages += [{'role': 'user', 'content': text},
                             {'role': 'assistant', 'content': answer}]
        except DataError as e:  # e.g. a character the tokenizer refuses: ask again
            print(f'rustgpt-chat: error: {cli_errors.one_line(e)}', file=err)
        out.write('\n')
