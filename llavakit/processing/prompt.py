"""Conversations to token ids: chat templates (jinja2), `<image>` expansion, tokenization, detokenization.

Messages follow the Hugging Face conversation format: `{"role": ..., "content": str | [parts]}`
with parts `{"type": "text", "text": ...}` and `{"type": "image", "image"|"url"|"path"|"base64": ...}`;
OpenAI-style `{"type": "image_url", "image_url": {"url": ...}}` is accepted too.
"""

from __future__ import annotations

import functools

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..errors import ConfigError, PromptError

IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path")
ROLES = ("system", "user", "assistant")

# Used when a checkpoint ships no template: the published template of each family's LLaVA.
DEFAULT_TEMPLATES = {
    # LLaVA-1.5 (Vicuna): "USER: <image>\nWhat is shown? ASSISTANT:"
    "llama": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
        "{% else %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # LLaVA-NeXT Mistral: "[INST] <image>\nWhat is shown? [/INST]"
    "mistral": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
        "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ ' ' + content['text'] + eos_token + ' ' }}{% endgeneration %}{% endfor %}"
        "{% endif %}{% endfor %}"
    ),
    # Qwen2 ChatML, as LLaVA-OneVision: "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    "qwen2": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}"
        "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in HF templates; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """Special tokens are strings in new tokenizer_config.json files and {"content": ...} dicts in old ones."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers` tokenizer plus the special tokens transformers would read from tokenizer_config.json."""

    tok: Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    image_token: str
    video_token: str = "<video>"

    @property
    def image_token_id(self) -> int | None:
        """Id of the image placeholder token, None when the vocabulary lacks it."""
        return self.tok.token_to_id(self.image_token)

    def token_id(self, token: str | None) -> int | None:
        """Id of a token string, None for None or an unknown token."""
        return None if token is None else self.tok.token_to_id(token)

    def special_tokens(self) -> dict[str, str]:
        """The template variables transformers passes (bos_token, eos_token, ...)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.unk_token, "image_token": self.image_token, "video_token": self.video_token}
        return {k: v for k, v in names.items() if v is not None}

    def encode(self, text: str) -> list[int]:
        """Token ids; special tokens (BOS) added as the tokenizer's post-processor says, unless the text starts with BOS."""
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens left out by default)."""
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: Path) -> TextTokenizer:
    """Read tokenizer.json and the special tokens of tokenizer_config.json (and processor_config.json)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no tokenizer.json; llavakit needs the fast-tokenizer file "
            "(re-save the tokenizer with transformers to create it)."
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise ConfigError(f"{path} could not be read: {e}") from e
    cfg = _read_json(folder / "tokenizer_config.json")
    proc = _read_json(folder / "processor_config.json")
    return TextTokenizer(
        tok=tok,
        bos_token=_token_text(cfg.get("bos_token")),
        eos_token=_token_text(cfg.get("eos_token")),
        pad_token=_token_text(cfg.get("pad_token")),
        unk_token=_token_text(cfg.get("unk_token")),
        image_token=_token_text(proc.get("image_token") or cfg.get("image_token")) or "<image>",
        video_token=_token_text(proc.get("video_token") or cfg.get("video_token")) or "<video>",
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def load_chat_template(folder: Path) -> str | None:
    """The checkpoint's template: chat_template.jinja, chat_template.json, then processor/tokenizer configs."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if isinstance(template, str):
            return template
    return None


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """Templates are compiled once: compiling costs far more than rendering a conversation."""
    return _ENV.from_string(template)


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str]) -> str:
    """Render a chat template exactly as transformers' apply_chat_template does."""
    try:
        compiled = _compiled(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"the chat template failed on this conversation: {e}") from e


@dataclass(frozen=True)
class VideoPart:
    """A video in a conversation: its source and optional per-video sampling."""

    source: Any
    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None


@dataclass(frozen=True)
class Conversation:
    """A validated conversation: template-ready messages, and its media in order."""

    messages: list[dict]
    images: list[Any]
    videos: list[VideoPart]


def split_conversation(messages: Any) -> Conversation:
    """Validate a conversation; return it in template form (parts without payloads) and its media in order.

    Plain-string content becomes one text part. Raises PromptError for malformed messages.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages.")
    out, images, videos = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {str(m)[:80]!r}.")
        if m["role"] not in ROLES:
            raise PromptError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}.")
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"message {i} content must be a string or a list of parts.")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise PromptError(f"message {i}: a text part needs a string 'text'.")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                images.append(_image_source(part, i))
                parts.append({"type": "image"})
            elif kind == "video":
                videos.append(_video_part(part, i))
                parts.append({"type": "video"})
            else:
                raise PromptError(
                    f"message {i}: content part type {kind!r} is not supported; use 'text', 'image' or 'video'."
                )
        out.append({"role": m["role"], "content": parts})
    return Conversation(out, images, videos)


def _image_source(part: dict, i: int) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if url is None:
            raise PromptError(f"message {i}: an image_url part needs {{'image_url': {{'url': ...}}}}.")
        return url
    for key in IMAGE_KEYS:
        if part.get(key) is not None:
            return part[key]
    raise PromptError(f"message {i}: an image part needs one of {', '.join(IMAGE_KEYS)}.")


def _video_part(part: dict, i: int) -> VideoPart:
    source = next((part[k] for k in VIDEO_KEYS if part.get(k) is not None), None)
    if source is None:
        raise PromptError(f"message {i}: a video part needs one of {', '.join(VIDEO_KEYS)}.")
    return VideoPart(source, part.get("num_frames"), part.get("fps"), part.get("max_frames"))


def expand_image_tokens(text: str, image_token: str, counts: list[int], kind: str = "image") -> str:
    """Replace the i-th `image_token` with counts[i] copies; the number of placeholders must match the media."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(counts):
        raise PromptError(
            f"the prompt has {len(pieces) - 1} {image_token} placeholder(s) but {len(counts)} {kind}(s) were given; "
            f"each {kind} needs exactly one placeholder."
        )
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(image_token * count)
        out.append(piece)
    return "".join(out)


def chunked_ids(tok: TextTokenizer, text: str, placeholders: list[tuple[str, int | None, list[int]]]) -> list[int]:
    """Token ids the way the original LLaVA code builds them: each text chunk between placeholders
    tokenized on its own (BOS kept once, at the start), placeholder runs of reserved ids between.

    placeholders: (placeholder text, id, token count per occurrence in order) for images and videos.
    Raises PromptError when the text's placeholders and the media do not pair up.
    """
    active = [(s, i, list(c)) for s, i, c in placeholders if i is not None]
    pattern = "(" + "|".join(re.escape(s) for s, _, _ in active) + ")"
    pieces = re.split(pattern, text)
    queues = {s: (i, c) for s, i, c in active}
    for s, (_, counts) in queues.items():
        found = pieces[1::2].count(s)
        if found != len(counts):
            raise PromptError(f"the prompt has {found} {s} placeholder(s) but {len(counts)} were given; "
                              "each image or video needs exactly one placeholder.")
    bos = tok.token_id(tok.bos_token)
    first = tok.tok.encode(pieces[0], add_special_tokens=True).ids
    skip = 1 if first and bos is not None and first[0] == bos else 0
    ids = list(first)
    for marker, chunk in zip(pieces[1::2], pieces[2::2]):
        token_id, counts = queues[marker]
        ids += [token_id] * counts.pop(0)
        ids += tok.tok.encode(chunk, add_special_tokens=True).ids[skip:]
    return ids


class StreamDecoder:
    """Incremental detokenization that never emits half a UTF-8 character.

    Decodes a short window of recent ids and emits only the new suffix once it no longer ends in
    U+FFFD, which is what a byte-level tokenizer shows for an incomplete multi-byte character.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        now = decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left when generation ends (a dangling partial character shows as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]
