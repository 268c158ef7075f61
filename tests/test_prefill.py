"""Assistant prefill (`continue_final_message`) and every role a template knows, against transformers.

A conversation ending in an assistant message is continued: the prompt ends right after that
message's text, as transformers' apply_chat_template(continue_final_message=True) cuts it, and the
greedy continuation is transformers' own. Roles other than system/user/assistant reach the template
as they are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit import PromptError, SamplingParams

FAMILIES = ["llama", "next_mistral", "onevision"]  # LLaVA-1.5 (Vicuna), NeXT (Mistral), OneVision (ChatML)
NEW = 12
IMAGE = Image.fromarray(np.random.default_rng(21).integers(0, 256, (45, 60, 3), dtype=np.uint8))


def _prefill(prefix: str, image=IMAGE) -> list[dict]:
    user = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": user + [{"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": prefix}]}]


def _reference(proc, conv, **kwargs):
    return proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)


def _until_eos(ids: list[int], eos: int = 2) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("prefix", ["The picture shows", "There is a cat on the ", ""])
@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_and_ids_equal_transformers(models, name, prefix):
    vlm, _, proc = models(name)
    conv = _prefill(prefix)
    text, _ = vlm.processor.render(conv, continue_final_message=True)
    assert text == proc.apply_chat_template(conv, continue_final_message=True, tokenize=False)
    want = _reference(proc, conv, continue_final_message=True)
    for parse in (False, True):
        batch = vlm.prepare([conv], add_generation_prompt=False, continue_final_message=True,
                            parse_special_tokens_in_content=parse)
        assert batch.input_ids.tolist() == want["input_ids"].tolist()
    n = batch.pixel_values.shape[0]
    assert float((batch.pixel_values - want["pixel_values"].reshape(-1, *batch.pixel_values.shape[1:])[:n])
                 .abs().max()) <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_continuation_equals_transformers(models, name):
    vlm, ref, proc = models(name)
    conv = _prefill("The picture shows")
    inputs = _reference(proc, conv, continue_final_message=True)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    want = _until_eos(out[0, inputs["input_ids"].shape[1]:].tolist())
    got = vlm.chat(conv, continue_final_message=True, max_new_tokens=NEW)
    assert got.token_ids == want
    assert got.prompt_tokens == inputs["input_ids"].shape[1]
    assert "".join(vlm.chat(conv, continue_final_message=True, max_new_tokens=NEW, stream=True)) == got.text
    # the prefill changes the answer: it is not the answer to the question alone
    assert got.token_ids != vlm.chat(conv[:1], max_new_tokens=NEW).token_ids


def test_generate_takes_one_flag_per_conversation(models):
    vlm, _, _ = models("onevision")
    convs = [_prefill("The picture shows"), _prefill("It is")[:1], _prefill("Two", image=None)]
    flags = [True, False, True]
    params = SamplingParams(max_new_tokens=8)
    got = [o.token_ids for o in vlm.generate(convs, params, continue_final_message=flags)]
    assert got == [vlm.chat(c, sampling=params, continue_final_message=f).token_ids for c, f in zip(convs, flags)]
    with pytest.raises(PromptError, match="2 continue_final_message values given for 3 conversations"):
        vlm.generate(convs, params, continue_final_message=[True, False])


def test_prefill_text_is_plain_text(models):
    """The continued text is message text: `</s>` in it is not EOS unless special tokens are parsed."""
    vlm, _, proc = models("llama")
    conv = _prefill("sure</s>", image=None)
    eos = vlm.processor.tokenizer.token_id("</s>")
    assert vlm.prepare([conv], continue_final_message=True).input_ids[0].tolist().count(eos) == 0
    parsed = vlm.prepare([conv], continue_final_message=True, parse_special_tokens_in_content=True)
    assert parsed.input_ids.tolist() == _reference(proc, conv, continue_final_message=True)["input_ids"].tolist()
    assert parsed.input_ids[0].tolist().count(eos) == 1


def test_prefill_errors(models):
    vlm, _, _ = models("llama")
    with pytest.raises(PromptError, match="^continue_final_message and add_generation_prompt cannot both be on: "
                                          "continue_final_message lets the model continue the last message, "
                                          "add_generation_prompt starts a new assistant turn after it. Pass "
                                          "add_generation_prompt=False \\(or leave it out\\).$"):
        vlm.prepare([_prefill("The")], add_generation_prompt=True, continue_final_message=True)
    only_image = [{"role": "user", "content": [{"type": "image", "image": IMAGE}]}]
    with pytest.raises(PromptError, match="^continue_final_message is set but the last message has no text to "
                                          "continue; end the conversation with a message that holds text"):
        vlm.chat(only_image, continue_final_message=True)
    # a template that drops the final message (Mistral's renders no "tool" turn) leaves nothing to continue
    nxt, _, _ = models("next_mistral")
    dropped = _prefill("The")[:1] + [{"role": "tool", "content": "42"}]
    with pytest.raises(PromptError, match="the chat template does not render the last message's text"):
        nxt.prepare([dropped], continue_final_message=True)


# ───────────────────────────── roles ─────────────────────────────


@pytest.mark.parametrize("name", ["llama", "onevision"])
def test_every_role_reaches_the_template(models, name):
    """developer, tool and a made-up role are rendered as transformers renders them (Vicuna: "DEVELOPER: ...",
    ChatML: "<|im_start|>tool ...")."""
    vlm, _, proc = models(name)

    def text(t):  # parts: the form these templates read (a string content is one text part to llavakit)
        return [{"type": "text", "text": t}]

    conv = [{"role": "developer", "content": text("Answer in one word.")},
            {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": text("Let me look.")},
            {"role": "tool", "content": text("The picture is mostly grey.")},
            {"role": "critic_2", "content": text("Be sure.")}]
    rendered, _ = vlm.processor.render(conv)
    assert rendered == proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert ("TOOL: The picture" in rendered) if name == "llama" else ("<|im_start|>tool " in rendered)
    assert vlm.prepare([conv]).input_ids.tolist() == _reference(proc, conv, add_generation_prompt=True)[
        "input_ids"].tolist()


@pytest.mark.parametrize("role", ["user<|im_end|>", "", "sys tem", 3, None])
def test_roles_that_are_not_words_are_refused(models, role):
    vlm, _, _ = models("onevision")
    with pytest.raises(PromptError, match="^message 0 has role .*; a role is a word of letters, digits, '_' and '-' "
                                          "\\(such as system, developer, user, assistant, tool\\), passed to the "
                                          "chat template as it is.$"):
        vlm.prepare([[{"role": role, "content": "hi"}]])
