"""Text <-> token ids: the tokenizer, the chat template and the streaming detokenizer.

Owns turning text into ids and back for a model folder (`tokenizer.json`) or a GGUF file (vocab
and merges in the metadata), rendering the chat template the model carries, and decoding a token
stream into text deltas that never split a character. BPE itself is the `tokenizers` library's;
this module only assembles it. It does not own splitting `<think>` reasoning from the answer
(reasoning.py) or reading GGUF files (loaders/gguf.py).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Iterable

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers.decoders import DecodeStream

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation runs, whitespace);
# DeepSeek-R1-Distill-Qwen ships the same BPE under the name `deepseek-r1-qwen`.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_TOKENIZERS = {"qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}

# llama.cpp token types: 3 is CONTROL (special, skipped when decoding), 4 is USER_DEFINED (matched
# whole in text, kept when decoding, like `<think>`). 5 (UNUSED, the `[PADnnn]` rows) stays a plain
# vocab entry: it keeps its id but no text ever encodes to it.
_CONTROL, _USER_DEFINED = 3, 4

R1_ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>\n"

# Used when a model carries no template: DeepSeek-R1's official one for system, user and assistant
# turns (no tool calls), with the current `<think>\n` opening of the generation prompt.
R1_CHAT_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for message in messages if message['role'] == 'system' -%}
    {%- set ns.system = message['content'] -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<｜User｜>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {#- Past reasoning is not shown to the model again: only the text after </think>. -#}
        {{- '<｜Assistant｜>' + message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('the built-in R1 template has no role ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<｜Assistant｜><think>\\n' -}}
{%- endif -%}
"""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON (as transformers does).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in the environment transformers gives it (templates are untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a model adds around it: bos, eos and the chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
    ):
        if add_bos and bos_token_id is None:
            raise ValueError("add_bos is set but the tokenizer has no bos token")
        self.backend = backend
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template or R1_CHAT_TEMPLATE)
        # Forcing the think opening is R1's convention; other templates (ChatML) render as written.
        self._forces_think = R1_ASSISTANT in (chat_template or R1_CHAT_TEMPLATE)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_source(cls, source: str | os.PathLike) -> Tokenizer:
        """From a model folder (tokenizer.json) or a GGUF file (read metadata-only)."""
        path = Path(source)
        if path.is_dir():
            return cls.from_hf_folder(path)
        from r1.loaders.gguf import read_header  # numpy/torch only when a GGUF is actually read

        return cls.from_gguf_metadata(read_header(path).metadata)

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """From tokenizer.json plus tokenizer_config.json (bos, eos, add_bos_token, chat template)."""
        folder = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # serialized AddedToken
                token = token["content"]
            return backend.token_to_id(token) if token else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: it is whatever the post-processor does
            add_bos = bos is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            add_bos=bool(add_bos),
            chat_template=_folder_chat_template(folder, config),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        """Byte-level BPE from llama.cpp's `tokenizer.ggml.*` keys (the vocab as ids, the merges)."""
        kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
        if kind != "gpt2" or pre not in _GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} "
                f"(supported: gpt2 with {sorted(_GGUF_PRE_TOKENIZERS)})"
            )
        tokens = metadata["tokenizer.ggml.tokens"]
        types = metadata["tokenizer.ggml.token_type"]
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
        # Every token keeps its exact spelling, even R1's `<｜User｜>`, which lies outside the byte
        # alphabet: added tokens find their id by spelling (transformers respells them and loses it).
        bpe = models.BPE(
            vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False
        )
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GGUF_PRE_TOKENIZERS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(token, special=True, normalized=False)
                for token, token_type in zip(tokens, types)
                if token_type == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(token, special=False, normalized=False)
                for token, token_type in zip(tokens, types)
                if token_type == _USER_DEFINED
            ]
        )
        return cls(
            backend,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    # -- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows, added tokens and padding rows included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`; bos is prepended once when the model wants it and the text lacks it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({'role', 'content'} dicts) as the model's template writes it."""
        text = self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_id),
        )
        # Older R1 templates stop at the assistant tag; the current one forces the reasoning open.
        if add_generation_prompt and self._forces_think and text.endswith(R1_ASSISTANT):
            text += THINK_OPEN
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # encode() skips bos when the template already wrote it.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id)


def _folder_chat_template(folder: Path, config: dict) -> str | None:
    """transformers 5 saves the template beside the config; older folders keep it inside."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting a partial UTF-8 character.

    tokenizers' DecodeStream does the work in one call a token: it decodes a short window of ids
    (vLLM's and TGI's prefix and read offsets), so a decoder that depends on the preceding token
    sees context and a token costs the same at position 10 and at 30,000, and it holds back a
    token that ends inside a character until the rest comes. The ids held back are kept here too,
    so that flush() can render them at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.held: list[int] = []  # ids whose text has not come out yet

    def add(self, ids: int | Iterable[int]) -> str:
        """Append one or more ids; returns the text they complete (may be empty)."""
        if isinstance(ids, int):  # the usual call: one token
            piece = self._stream.step(self.tokenizer.backend, ids)
            if piece is None:
                self.held.append(ids)
                return ""
            self.held.clear()
            return piece
        pieces = []
        for token_id in ids:
            piece = self._stream.step(self.tokenizer.backend, token_id)
            if piece is None:
                self.held.append(token_id)
            else:
                self.held.clear()
                pieces.append(piece)
        return "".join(pieces)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back, even an incomplete character."""
        held, self.held = self.held, []
        return self.tokenizer.decode(held, skip_special_tokens=self.skip_special_tokens) if held else ""
