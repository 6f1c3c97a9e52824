"""Chat templates against transformers' `apply_chat_template`, and `rustgpt-chat` using them.

Oracle: a transformers tokenizer (AutoTokenizer over a tokenizer.json written here) renders
the same messages with the same template; the strings must be identical. The templates
are the real ones of TinyLlama-Chat (Zephyr), Llama-2-chat and ChatML, copied verbatim.
"""

import io
import json

import pytest
import transformers
from test_gguf_format import random_params
from test_gguf_llamacpp import small_llama_vocab
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.data import CHAT_TEMPLATE, HFTokenizer, format_prompt
from rustgpt_jax.decoding import chat_template as ct
from rustgpt_jax.decoding import cli
from rustgpt_jax.interop import hf
from rustgpt_jax.interop.gguf import GGUFTokenizer, load_gguf, save_gguf

ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}"
          "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
          "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {'zephyr': ZEPHYR, 'llama2': LLAMA2, 'chatml': CHATML, 'ours': CHAT_TEMPLATE}
# id 0 is ChatML's end of turn (see test_chat_cli_on_an_hf_directory_stops_at_end_of_turn).
SPECIALS = ['<|im_end|>', '<s>', '</s>', '<unk>', '<|im_start|>', '<|user|>', '<|assistant|>',
            '<|system|>']
CHARS = sorted(set('abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!:[]<>/|\n\'é'))

CONVERSATIONS = [
    [{'role': 'user', 'content': 'Hi there!'}],
    [{'role': 'system', 'content': 'You are terse.'}, {'role': 'user', 'content': 'Why?'}],
    [{'role': 'user', 'content': ' a '}, {'role': 'assistant', 'content': 'b.'},
     {'role': 'user', 'content': "l'été?"}],
]


def _raw_tokenizer() -> RawTokenizer:
    vocab = {p: i for i, p in enumerate(SPECIALS + CHARS)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return raw


def _hf_dir(tmp_path, template):
    """A tokenizer directory both transformers and HFTokenizer.from_directory read."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    _raw_tokenizer().save(str(tmp_path / 'tokenizer.json'))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>',
              'eos_token': '</s>', 'unk_token': '<unk>', 'chat_template': template}
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(tmp_path), HFTokenizer.from_directory(
        tmp_path)


@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_render_matches_apply_chat_template(tmp_path, name):
    theirs, ours = _hf_dir(tmp_path, TEMPLATES[name])
    assert ours.chat_template == TEMPLATES[name]
    chat = ct.ChatFormat(ours.chat_template, ct.special_tokens_of(ours))
    checked = 0
    for messages in CONVERSATIONS:
        for generation in (True, False):
            try:
                expected = theirs.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation)
            except Exception as e:  # the template refuses (ours: a system message)
                with pytest.raises(ct.ChatTemplateError, match='only user and assistant'):
                    chat.render(messages, add_generation_prompt=generation)
                assert name == 'ours' and 'user and assistant' in str(e)
                continue
            assert chat.render(messages, add_generation_prompt=generation) == expected
            checked += 1
    assert checked == (4 if name == 'ours' else 6)
    assert chat.supports_system() == (name != 'ours')
    eot = ct.end_of_turn_id(chat, ours)
    expected_eot = {'zephyr': '</s>', 'llama2': '</s>', 'chatml': '<|im_end|>', 'ours': None}
    assert (None if eot is None else SPECIALS[eot]) == expected_eot[name]


def test_our_template_is_the_training_format():
    one = [{'role': 'user', 'content': 'To be?'}]
    assert ct.render(CHAT_TEMPLATE, one) == format_prompt('To be?')
    with pytest.raises(ct.ChatTemplateError, match='does not compile'):
        ct.render('{% for %}', one)


class _Recorder:
    """Wraps cli.stream: records each prompt's ids and counts the tokens it yields."""

    def __init__(self, stream):
        self.stream, self.prompts, self.counts = stream, [], []

    def __call__(self, model, params, prompt, **kwargs):
        self.prompts.append(list(prompt))
        self.counts.append(0)
        for token in self.stream(model, params, prompt, **kwargs):
            self.counts[-1] += 1
            yield token


def _chat(argv, stdin):
    out, err = io.StringIO(), io.StringIO()
    code = cli.chat_main(argv, stdin=io.StringIO(stdin), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_chat_cli_on_an_hf_directory_stops_at_end_of_turn(tmp_path, monkeypatch):
    theirs, tokenizer = _hf_dir(tmp_path / 'tok', CHATML)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=32, hidden_dim=48,
                         num_layers=1, num_heads=2, num_kv_heads=2, max_seq_len=256)
    params = random_params(config)
    # A zero final norm gives all-zero logits: greedy picks id 0, ChatML's <|im_end|>,
    # which is not EOS: the answer must end there, after one token.
    params['final_norm']['scale'][:] = 0.0
    hf.save_pretrained(tmp_path / 'model', config, params, tokenizer)
    recorder = _Recorder(cli.stream)
    monkeypatch.setattr(cli, 'stream', recorder)
    code, out, err = _chat(['--hf', str(tmp_path / 'model'), '--temperature', '0',
                            '--max_new_tokens', '4', '--system', 'Be brief.'], 'hi\nho\n')
    assert code == 0, err
    assert out == "Type a message; 'exit' quits.\nUser: Assistant: \nUser: Assistant: \nUser: "
    assert recorder.counts == [1, 1]
    history = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'},
               {'role': 'assistant', 'content': ''}, {'role': 'user', 'content': 'ho'}]
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / 'model')
    expected = exported.apply_chat_template(history, tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
    assert recorder.prompts[1] == list(expected)


def test_chat_cli_on_a_gguf_file_renders_its_template(tmp_path, monkeypatch):
    vocab = small_llama_vocab()
    tok = GGUFTokenizer('llama', vocab.tokens, scores=vocab.scores,
                        token_types=vocab.token_types, bos_id=1, eos_id=2, unk_id=0,
                        add_bos=True, chat_template=ZEPHYR)
    config = ModelConfig(vocab_size=tok.vocab_size, embed_dim=32, hidden_dim=48, num_layers=1,
                         num_heads=2, num_kv_heads=2, max_seq_len=128)
    path = save_gguf(tmp_path / 'zephyr.gguf', config, random_params(config), tok)
    _, _, loaded = load_gguf(path)
    assert loaded.chat_template == ZEPHYR
    recorder = _Recorder(cli.stream)
    monkeypatch.setattr(cli, 'stream', recorder)
    code, out, err = _chat(['--gguf', str(path), '--temperature', '0', '--max_new_tokens', '3',
                            '--system', 'the world'], 'hello\n')
    assert code == 0, err
    theirs, _ = _hf_dir(tmp_path, ZEPHYR)
    text = theirs.apply_chat_template([{'role': 'system', 'content': 'the world'},
                                       {'role': 'user', 'content': 'hello'}], tokenize=False,
                                      add_generation_prompt=True)
    # Zephyr's prompt has no BOS; the GGUF vocabulary adds one, as llama.cpp does.
    assert recorder.prompts == [[1] + loaded.encode(text, special=True)]
    assert vocab.tokens.index('<|user|>') in recorder.prompts[0]  # one id, the special piece
    assert recorder.prompts[0].count(2) == 2  # '</s>' after each turn, parsed as EOS
    code, out, err = _chat(['--gguf', str(path), '--template', 'chat', '--system', 'x'], '')
    assert code == 2 and '--system needs a chat template' in err
