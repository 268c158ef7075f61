"""The server's assistant prefill (vLLM's `continue_final_message` / `add_generation_prompt`) and
OpenAI's `developer` role, against the same checkpoint loaded in this process."""

from __future__ import annotations

import pytest

from llavakit.server.completions import template_role
from server_helpers import image_message, local_message, png_bytes

QUESTION = "What is in the picture?"


def test_continue_final_message_equals_vlm_chat(server, local_vlm):
    s, vlm = server("onevision"), local_vlm("onevision")
    image = png_bytes(44, 30, seed=5)
    prefix = {"role": "assistant", "content": "The picture shows"}
    r = s.client().chat.completions.create(
        model="onevision", messages=image_message(QUESTION, image) + [prefix], max_tokens=10, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    conv = local_message(QUESTION, image) + [prefix]
    want = vlm.chat(conv, continue_final_message=True, max_new_tokens=10)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(vlm.processor.encode(conv, continue_final_message=True).input_ids)
    # continue_final_message alone turns the generation prompt off, as in the Python API
    alone = s.client().chat.completions.create(
        model="onevision", messages=image_message(QUESTION, image) + [prefix], max_tokens=10, temperature=0,
        extra_body={"continue_final_message": True})
    assert alone.choices[0].message.content == want.text


def test_prefill_errors_are_400(server):
    s = server("onevision")
    body = {"model": "onevision", "max_tokens": 4, "continue_final_message": True, "add_generation_prompt": True,
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    status, err, _ = s.post(body)
    assert status == 400
    assert err["error"]["message"] == (
        "request: continue_final_message and add_generation_prompt cannot both be true: continuing the last message "
        "leaves no room for a new turn; set add_generation_prompt to false.")
    status, err, _ = s.post({**body, "add_generation_prompt": "no"})
    assert status == 400 and err["error"]["param"] == "add_generation_prompt"


def test_developer_role_is_system_for_templates_that_do_not_know_it(server, local_vlm):
    s, vlm = server("onevision"), local_vlm("onevision")
    messages = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    r = s.client().chat.completions.create(model="onevision", messages=messages, max_tokens=8, temperature=0)
    want = vlm.chat([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
                    max_new_tokens=8)
    assert r.choices[0].message.content == want.text


@pytest.mark.parametrize("role, template, want", [
    ("developer", "{{ messages[0]['role'] }}", "system"),
    ("developer", "{% if m.role == 'developer' %}{% endif %}", "developer"),
    ("system", "{{ x }}", "system"), ("user", "developer", "user"),
])
def test_template_role(role, template, want):
    assert template_role(role, template) == want
