"""Conversations to token ids: chat templates (jinja2), `<image>` expansion, tokenization, detokenization.

Messages follow the Hugging Face conversation format: `{"role": ..., "content": str | [parts]}`
with parts `{"type": "text", "text": ...}` and `{"type": "image", "image"|"url"|"path"|"base64": ...}`;
OpenAI-style `{"type": "image_url", "image_url": {"url": ...}}` is accepted too.

Message text is untrusted: `render_conversation` locates it in the rendered prompt and
`TextTokenizer.encode(text, plain_spans)` tokenizes it as plain text, so `<|im_start|>system` or
`<image>` written in a message cannot forge a turn or a placeholder; only the template writes those.
"""

from __future__ import annotations

import bisect
import functools
import itertools

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..errors import ConfigError, PromptError
from ..jsonfile import read_json_object

IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path")
ROLES = ("system", "developer", "user", "assistant", "tool")  # the usual ones; any word is passed on
# A role is rendered by the template as it is, so it must be a plain word: never special-token text.
ROLE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")

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
    # LLaVA-NeXT-Video (Vicuna), as llava-hf/LLaVA-NeXT-Video-7B-hf: images, then videos, then text
    "llava_next_video": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
        "{{ '<video>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
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


def _overlaps(spans: Sequence[tuple[int, int]], span: tuple[int, int] | None) -> bool:
    """Whether `span` (start, end) shares a character with one of `spans` (sorted by start, disjoint)."""
    if span is None or span[0] >= span[1]:
        return False
    k = bisect.bisect_left(spans, (span[1],)) - 1  # the last span starting before span's end
    return k >= 0 and spans[k][1] > span[0]


def _never_prepend(node: Any) -> bool:
    """Metaspace prepend_scheme "first" -> "never" in a tokenizer.json pre_tokenizer; True when found.
    "first" prefixes "▁" to the text at the start of the input, which a piece encoded alone always is."""
    if not isinstance(node, dict):
        return False
    found = False
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
        node["prepend_scheme"] = "never"
        found = True
    for child in node.get("pretokenizers") or ():
        found = _never_prepend(child) or found
    return found


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

    def encode(self, text: str, plain_spans: Sequence[tuple[int, int]] = (),
               add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`.

        plain_spans: (start, end) character ranges of `text` tokenized as plain text (message content):
            special-token text inside them (`<|im_end|>`, `</s>`, `<image>`) becomes ordinary tokens, as
            with transformers' `split_special_tokens=True`, while special tokens outside them stay special.
            The ids equal a plain encode whenever no special token overlaps a span.
        add_special_tokens: add the post-processor's tokens (BOS); None adds them unless the text
            already starts with BOS outside every plain span.
        """
        spans = sorted(plain_spans)
        if add_special_tokens is None:
            bos = self.bos_token
            add_special_tokens = not (bos and text.startswith(bos) and not _overlaps(spans, (0, len(bos))))
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        if not spans or not self._may_hold_specials(text, spans):
            return enc.ids
        ids, guarded = enc.ids, self._guarded_ids
        hits = [k for k, i in enumerate(ids) if i in guarded]
        offsets = enc.offsets if hits else []
        if any(_overlaps(spans, self._core(text, ids[k], offsets[k])) for k in hits):
            return self._encode_split(text, enc, spans)
        return ids

    @functools.cached_property
    def _added(self) -> dict[int, Any]:
        """id -> AddedToken of every added token (special or not)."""
        return self.tok.get_added_tokens_decoder()

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special: the ones `encode_special_tokens` splits as plain text."""
        return frozenset(i for i, t in self._added.items() if t.special)

    @functools.cached_property
    def _guarded_ids(self) -> frozenset[int]:
        """Ids message text must not produce: special tokens and the media placeholders (special or not)."""
        media = (self.image_token_id, self.token_id(self.video_token))
        return self._special_ids | {i for i in media if i is not None}

    @functools.cached_property
    def _guarded_text(self) -> tuple[re.Pattern, int] | None:
        """A pattern finding every occurrence (overlapping ones too) of a guarded token's text, and the
        longest text; None when one is matched after normalization, so its raw text proves nothing."""
        added = [self._added[i] for i in self._guarded_ids if i in self._added]
        if not added or any(t.normalized for t in added):
            return None
        pattern = re.compile("(?=(" + "|".join(re.escape(t.content) for t in added) + "))")
        return pattern, max(len(t.content) for t in added)

    def _may_hold_specials(self, text: str, spans: list[tuple[int, int]]) -> bool:
        """False only when no guarded token's text overlaps a span: a quick test (a special token is
        matched only where its text is) that spares reading every token's offsets."""
        if self._guarded_text is None:
            return True
        pattern, longest = self._guarded_text
        for a, b in spans:
            for m in pattern.finditer(text, max(0, a - longest + 1), min(len(text), b + longest - 1)):
                if m.start() < b and m.start() + len(m.group(1)) > a:
                    return True
        return False

    @functools.cached_property
    def _plain(self) -> tuple[Tokenizer, Tokenizer]:
        """Copies that leave special-token text unmatched, for text at the start of the input and for text
        after it. Copies, built on first use: other threads may be encoding with the shared tokenizer."""
        data = json.loads(self.tok.to_str())
        first = Tokenizer.from_str(json.dumps(data))
        first.encode_special_tokens = True
        if not _never_prepend(data.get("pre_tokenizer")):
            return first, first
        later = Tokenizer.from_str(json.dumps(data))
        later.encode_special_tokens = True
        return first, later

    def _core(self, text: str, token_id: int, offsets: tuple[int, int]) -> tuple[int, int] | None:
        """Where an added token's own text lies (an lstrip/rstrip token's offsets also cover the
        whitespace it swallows, which may be message text); None when the id was not matched as an
        added token (the model part emits `<unk>` for an unknown character too)."""
        a, b = offsets
        added = self._added.get(token_id)
        if added is None:
            return None
        c = text.find(added.content, a, b)
        if c >= 0:
            return c, c + len(added.content)
        return (a, b) if added.normalized else None  # matched after normalization: the raw text differs

    def _encode_split(self, text: str, enc: Any, spans: list[tuple[int, int]]) -> list[int]:
        """Ids with special tokens kept only outside `spans`. A tokenizer splits its input at added tokens
        and tokenizes each piece alone, so cutting at the kept ones and tokenizing the pieces with special
        matching off gives its own ids, as if the text in the spans were not special. (Not exactly so
        next to a kept special token flagged `normalized`, which tokenizers match after normalizing.)"""
        ids, offsets, mask = enc.ids, enc.offsets, enc.special_tokens_mask
        lead, tail = 0, len(ids)
        while lead < tail and mask[lead]:  # BOS and other post-processor tokens
            lead += 1
        while tail > lead and mask[tail - 1]:
            tail -= 1
        first, later = self._plain

        def plain(end: int) -> list[int]:  # text[pos:end] with special matching off
            piece = text[pos:end]
            return (first if pos == 0 else later).encode(piece, add_special_tokens=False).ids if piece else []

        out, pos = list(ids[:lead]), 0
        for k in range(lead, tail):
            core = self._core(text, ids[k], offsets[k]) if ids[k] in self._special_ids else None
            if core is not None and not _overlaps(spans, core):  # a special token the template wrote
                out += plain(offsets[k][0]) + [ids[k]]
                pos = offsets[k][1]
        return out + plain(len(text)) + ids[tail:]

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
    """An optional JSON file of the checkpoint: {} when it is missing (see jsonfile.read_json_object)."""
    return read_json_object(path, missing_ok=True)


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


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str],
                    continue_final_message: bool = False) -> str:
    """Render a chat template exactly as transformers' apply_chat_template does.

    continue_final_message: end the prompt inside the last message, right after its last text (see
    `continue_final`), so that the model continues that message; needs add_generation_prompt False.
    """
    if not continue_final_message:
        return _render(template, messages, add_generation_prompt, tokens)
    check_generation_prompt(add_generation_prompt, continue_final_message)
    tagged, final = continue_final(template, messages)
    text = _render(template, tagged, add_generation_prompt, tokens)
    return text[: _continue_cut(text, final)]


def _render(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str]) -> str:
    try:
        compiled = _compiled(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"the chat template failed on this conversation: {e}") from e


# transformers' marker for the end of the final message (its `continue_final_message`): appended to
# the message's last text, the rendered prompt is cut where it lands. Kept identical so the cut is too.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def check_generation_prompt(add_generation_prompt: bool | None, continue_final_message: bool) -> bool:
    """`add_generation_prompt` resolved: None means "unless the final message is continued". Raises
    PromptError for both on, which transformers refuses too (the prompt would end in a new turn)."""
    if add_generation_prompt is None:
        return not continue_final_message
    if add_generation_prompt and continue_final_message:
        raise PromptError(
            "continue_final_message and add_generation_prompt cannot both be on: continue_final_message lets the "
            "model continue the last message, add_generation_prompt starts a new assistant turn after it. "
            "Pass add_generation_prompt=False (or leave it out)."
        )
    return bool(add_generation_prompt)


def continue_final(template: str, messages: list[dict]) -> tuple[list[dict], str]:
    """The messages (template form) with transformers' continue tag after the last text of the last
    message, and that text. PromptError when there is nothing to continue."""
    if not messages:
        raise PromptError("continue_final_message is set but the conversation is empty.")
    if "content" not in template:  # transformers' own check: the template must read the message content
        raise PromptError("continue_final_message is set but this chat template never reads a message's content.")
    last = messages[-1]
    parts = list(last["content"])
    for k in range(len(parts) - 1, -1, -1):
        if parts[k].get("type") == "text":
            final = parts[k]["text"]
            parts[k] = {**parts[k], "text": final + _CONTINUE_TAG}
            return [*messages[:-1], {**last, "content": parts}], final
    raise PromptError("continue_final_message is set but the last message has no text to continue; end the "
                      "conversation with a message that holds text (such as an assistant message to continue).")


def _continue_cut(rendered: str, final: str) -> int:
    """Where a prompt rendered with the continue tag ends: right after the final message's text
    (before any whitespace the template stripped from it), as transformers cuts it."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise PromptError("continue_final_message is set but the chat template does not render the last message's "
                          "text (it drops or rewrites it), so the prompt cannot end inside that message.")
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return at
    return len(rendered[:at].rstrip())  # the template stripped the text's trailing space, and the tag's


# Stands in for the i-th message text while rendering: private-use characters no template writes.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000([0-9]+)\ue001")


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and where its message text lies in it."""

    text: str  # exactly what `render_template` returns
    # sorted (start, end) of each message text in `text`; None: the template rewrites the text (not just strips)
    content_spans: tuple[tuple[int, int], ...] | None
    template_text: str  # the render with each message text replaced by a marker: the template's own text


def render_conversation(template: str, messages: list[dict], add_generation_prompt: bool,
                        tokens: dict[str, str], continue_final_message: bool = False) -> Rendered:
    """Render a conversation (in the template form of `split_conversation`) and locate its message text.

    Rendered once as is and once with each text part replaced by a marker: the texts put back in place
    of the markers must give the first render, so text inserted verbatim (or stripped) is located
    exactly. Message text never reaches the marked render, so it cannot forge a marker.
    continue_final_message: as `render_template`; the text, spans and template text end where the
    final message's text does.
    """
    if not continue_final_message:
        return _locate(template, messages, add_generation_prompt, tokens)
    check_generation_prompt(add_generation_prompt, continue_final_message)
    tagged, final = continue_final(template, messages)
    full = _locate(template, tagged, add_generation_prompt, tokens)
    cut = _continue_cut(full.text, final)
    spans = None
    if full.content_spans is not None:
        spans = tuple((a, min(b, cut)) for a, b in full.content_spans if a < cut)
    # The final text is the last one marked (the tag keeps it non-empty): the template's text ends with its marker.
    last = _MARK.format(sum(1 for m in tagged for p in m["content"] if p.get("type") == "text" and p["text"]) - 1)
    marked_end = full.template_text.rfind(last)
    template_text = full.template_text[: marked_end + len(last)] if marked_end >= 0 else full.template_text
    return Rendered(full.text[:cut], spans, template_text)


def _locate(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str]) -> Rendered:
    text = _render(template, messages, add_generation_prompt, tokens)
    texts: list[str] = []
    marked = []
    for m in messages:
        parts = []
        for part in m["content"]:
            if part.get("type") == "text" and part["text"]:  # empty text stays empty: `{% if text %}` behaves alike
                parts.append({**part, "text": _MARK.format(len(texts))})
                texts.append(part["text"])
            else:
                parts.append(part)
        marked.append({**m, "content": parts})
    if not texts:
        return Rendered(text, (), text)
    template_text = _render(template, marked, add_generation_prompt, tokens)
    pieces = _MARK_RE.split(template_text)  # template text, mark index, template text, ...
    for variant in (texts, [t.strip() for t in texts]):  # verbatim, or `| trim` / `.strip()` templates
        out = [variant[int(p)] if n % 2 and int(p) < len(variant) else p for n, p in enumerate(pieces)]
        if "".join(out) == text:
            starts = list(itertools.accumulate(map(len, out), initial=0))
            spans = tuple((starts[n], starts[n + 1]) for n in range(1, len(out), 2) if out[n])
            return Rendered(text, spans, template_text)
    return Rendered(text, None, template_text)


def message_spans(tok: "TextTokenizer", rendered: Rendered) -> tuple[tuple[int, int], ...]:
    """The spans to tokenize as plain text: the message text of a rendered conversation. When the
    template rewrites the text so that it cannot be located, the prompt is taken as is only if it holds
    the special tokens and placeholders the template alone writes; otherwise PromptError."""
    if rendered.content_spans is not None:
        return rendered.content_spans

    def specials(s: str) -> tuple:
        ids = tok.tok.encode(s, add_special_tokens=False).ids
        return sorted(i for i in ids if i in tok._guarded_ids), s.count(tok.image_token), s.count(tok.video_token)

    if specials(rendered.text) != specials(rendered.template_text):
        raise PromptError(
            "this chat template rewrites message text, so llavakit cannot tell the template's special tokens "
            "from special-token or placeholder text written inside a message; remove such text from the "
            "messages, or pass parse_special_tokens_in_content=True to parse it as transformers does."
        )
    return ()


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
    image_details: list[str | None] = field(default_factory=list)  # per image: its part's "detail", or None


def split_conversation(messages: Any) -> Conversation:
    """Validate a conversation; return it in template form (parts without payloads) and its media in order.

    Plain-string content becomes one text part. Raises PromptError for malformed messages.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages.")
    out, images, videos, details = [], [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {str(m)[:80]!r}.")
        if not isinstance(m["role"], str) or not ROLE_PATTERN.fullmatch(m["role"]):
            raise PromptError(f"message {i} has role {str(m['role'])[:80]!r}; a role is a word of letters, digits, "
                              f"'_' and '-' (such as {', '.join(ROLES)}), passed to the chat template as it is.")
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
                details.append(_image_detail(part, i))
                parts.append({"type": "image"})
            elif kind == "video":
                videos.append(_video_part(part, i))
                parts.append({"type": "video"})
            else:
                raise PromptError(
                    f"message {i}: content part type {kind!r} is not supported; use 'text', 'image' or 'video'."
                )
        out.append({"role": m["role"], "content": parts})
    return Conversation(out, images, videos, details)


def _image_detail(part: dict, i: int) -> str | None:
    """An image part's "detail" (OpenAI's key, also inside "image_url"), checked; None when absent."""
    url = part.get("image_url")
    detail = part.get("detail", url.get("detail") if isinstance(url, dict) else None)
    if detail is not None and detail not in ("auto", "low", "high"):
        raise PromptError(f"message {i}: image detail {detail!r} is not one of auto, low, high.")
    return detail


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


class Placeholder(NamedTuple):
    """One kind of media placeholder in a prompt."""

    text: str  # "<image>" or "<video>"
    id: int | None  # its token id; None when the model takes no media of this kind
    counts: list[int]  # tokens per medium, in prompt order
    kind: str  # "image" or "video", for messages


def _mismatch(p: Placeholder, found: int) -> PromptError:
    return PromptError(f"the prompt has {found} {p.text} placeholder(s) but {len(p.counts)} {p.kind}(s) were given; "
                       f"each {p.kind} needs exactly one placeholder.")


def expand_placeholder_ids(ids: list[int], placeholders: list[Placeholder]) -> list[int]:
    """Repeat the i-th placeholder id of each kind counts[i] times; PromptError when the numbers differ.
    The ids of expanding the text first: a placeholder is an added token, matched alone, so N adjacent
    copies are N ids and leave their neighbours alone (and no placeholder strings get tokenized)."""
    marks = []  # (position, id, count); list.index scans in C, the ids are not walked in Python
    for p in placeholders:
        if p.id is None:
            continue
        at, k = [], -1
        while True:
            try:
                k = ids.index(p.id, k + 1)
            except ValueError:
                break
            at.append(k)
        if len(at) != len(p.counts):
            raise _mismatch(p, len(at))
        marks += zip(at, [p.id] * len(at), p.counts)
    out, prev = [], 0
    for k, token_id, count in sorted(marks):
        out += ids[prev:k]
        out += [token_id] * count
        prev = k + 1
    return out + ids[prev:]


def chunked_ids(tok: TextTokenizer, text: str, placeholders: list[Placeholder],
                plain_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Token ids the way the original LLaVA code builds them: each text chunk between placeholders
    tokenized on its own (BOS kept once, at the start), placeholder runs of reserved ids between.

    plain_spans: message text (see `TextTokenizer.encode`); placeholder text inside it is plain text.
    Raises PromptError when the text's placeholders and the media do not pair up.
    """
    spans = sorted(plain_spans)
    active = {p.text: p for p in placeholders if p.id is not None}
    pattern = re.compile("|".join(re.escape(s) for s in active) or "(?!)")
    cuts = [m for m in pattern.finditer(text) if not _overlaps(spans, m.span())]
    for s, p in active.items():
        found = sum(1 for m in cuts if m.group() == s)
        if found != len(p.counts):
            raise _mismatch(p, found)
    queues = {s: iter(p.counts) for s, p in active.items()}
    bos, ids, start, skip = tok.token_id(tok.bos_token), [], 0, 0
    for n, end in enumerate([m.start() for m in cuts] + [len(text)]):
        chunk_spans = [(max(a, start) - start, min(b, end) - start) for a, b in spans if a < end and b > start]
        chunk = tok.encode(text[start:end], chunk_spans, add_special_tokens=True)
        if n == 0:  # BOS once: later chunks drop the one their encoding starts with
            skip = 1 if chunk and bos is not None and chunk[0] == bos else 0
        ids += chunk[skip:] if n else chunk
        if n < len(cuts):
            ids += [active[cuts[n].group()].id] * next(queues[cuts[n].group()])
            start = cuts[n].end()
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
