"""LLaVA-NeXT-Video behind the server: image and video parts in one request, answered as vlm.chat answers."""

from __future__ import annotations

from server_helpers import data_url, mp4_bytes, png_bytes


def test_image_and_video_parts_equal_vlm_chat(server, local_vlm):
    s, vlm = server("next_video"), local_vlm("next_video")
    card = s.client().models.list().data[0].model_dump()
    assert (card["family"], card["input_modalities"]) == ("LLaVA-NeXT-Video", ["text", "image", "video"])
    clip, image = mp4_bytes(), png_bytes(50, 30, seed=4)
    want = vlm.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "video", "video": clip, "num_frames": 4},
                                                  {"type": "text", "text": "What happens?"}]}],
                    max_new_tokens=8, temperature=0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4"), "num_frames": 4}},
        {"type": "text", "text": "What happens?"}]}]
    r = s.client().chat.completions.create(model="next_video", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens
