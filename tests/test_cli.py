"""The command line, run as a user runs it: in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit


def _run(args, stdin=None, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    # Bytes in and out: random-weight answers may hold "\r", which text mode would turn into "\n".
    res = subprocess.run([sys.executable, "-m", "llavakit", *args], input=None if stdin is None else stdin.encode(),
                         capture_output=True, timeout=120, env=env)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pic.png"
    Image.fromarray((np.random.RandomState(3).rand(90, 140, 3) * 255).astype("uint8")).save(path)
    return path


def test_chat_answers_one_question_like_the_api(checkpoint, picture):
    path = checkpoint("llama")
    res = _run(["chat", "--model", str(path), "--dtype", "float32", "--image", str(picture),
                "--max-new-tokens", "12", "What is in the picture?"])
    assert res.returncode == 0, res.stderr
    vlm = llavakit.load(path, dtype=torch.float32)
    expected = vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                                      {"type": "text", "text": "What is in the picture?"}]}],
                        max_new_tokens=12)
    assert res.stdout == expected.text + "\n"


def test_interactive_chat_keeps_history_and_attaches_images(checkpoint, picture):
    path = checkpoint("llama")
    script = f"/image {picture}\nDescribe it.\n/image /no/such/file.png\nAnd now?\n/quit\n"
    res = _run(["chat", "--model", str(path), "--dtype", "float32", "--max-new-tokens", "6"], stdin=script)
    assert res.returncode == 0, res.stderr
    assert f"[attached {picture}]" in res.stderr
    assert "no image file at '/no/such/file.png'" in res.stderr
    vlm = llavakit.load(path, dtype=torch.float32)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": str(picture)}, {"type": "text", "text": "Describe it."}]}]
    a1 = vlm.chat(turn1, max_new_tokens=6).text
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": a1}]},
                     {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    a2 = vlm.chat(turn2, max_new_tokens=6).text
    # one prompt per input line: /image, question, /image, question, /quit
    assert res.stdout == f">>> >>> {a1}\n>>> >>> {a2}\n>>> "


def test_interactive_chat_recovers_from_a_bad_attachment(checkpoint, tmp_path, picture):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    script = f"/image {bad}\nfirst\n/image {picture}\nsecond\n"
    res = _run(["chat", "--model", str(checkpoint("llama")), "--dtype", "float32", "--max-new-tokens", "4"],
               stdin=script)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("error:") == 1  # the broken file fails its own turn only
    vlm = llavakit.load(checkpoint("llama"), dtype=torch.float32)
    second = [{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                           {"type": "text", "text": "second"}]}]
    assert res.stdout.endswith(f">>> {vlm.chat(second, max_new_tokens=4).text}\n>>> ")


def test_info_describes_the_checkpoint(checkpoint):
    res = _run(["info", "--model", str(checkpoint("qwen2")), "--json"])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["text_model"] == "qwen2" and info["model_type"] == "llava"
    assert info["image_tokens_per_image"] == 16 and info["text"]["layers"] == 2
    assert info["tokens"]["image"][0] == "<image>"


def test_info_prints_a_short_summary(checkpoint):
    picture = Path(__file__).resolve().parents[1] / "examples" / "picture.png"
    res = _run(["info", "--model", str(checkpoint("qwen2")), "--image", str(picture)])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) <= 40
    rows = {line.split("  ")[0]: line for line in lines}
    assert "LLaVA-1.5 (llava)" in rows["family"]
    assert "qwen2: 2 layers" in rows["decoder"]
    assert "image '<image>' = " in rows["tokens"]
    assert rows["image tokens"].endswith("16")
    assert f"image {picture}" in res.stdout and "96x96 px" in res.stdout
    assert "{%" not in res.stdout  # the template only with --json


def test_errors_exit_2_with_one_line(checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = _run(["chat", "--model", str(checkpoint("llama")), "--image", str(bad), "hi"])
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "bad.png" in res.stderr
    res = _run(["info", "--model", str(tmp_path / "missing")])
    assert res.returncode == 2 and "not a checkpoint folder" in res.stderr


def test_default_model_and_make_random(tmp_path):
    picture = Path(__file__).resolve().parents[1] / "examples" / "picture.png"
    res = _run(["chat", "--max-new-tokens", "8", "--image", str(picture), "How many shapes are there?"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3"  # the shipped model answers; nothing was built or downloaded
    res = _run(["chat", "--quantize", "int8", "--max-new-tokens", "8", "--image", str(picture),
                "How many shapes are there?"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3"  # the same answer from the int8 decoder
    res = _run(["make-random", "--out", str(tmp_path / "r"), "--layers", "1"])
    assert res.returncode == 0, res.stderr
    assert llavakit.load(tmp_path / "r").config.text.num_layers == 1