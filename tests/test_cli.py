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

# -- one name for the shipped model, --threads, defaults in --help -------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Runs main() and reports the torch thread count it left, so --threads is checked where it acts.
THREADS_PROBE = """
import sys, torch
from llavakit.cli import main
status = main(sys.argv[1:])
print(f"threads={torch.get_num_threads()}", file=sys.stderr)
sys.exit(status)
"""


def _env_without_thread_settings() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCH_NUM_THREADS")}


def test_llava_shapes_names_the_shipped_model(tmp_path, monkeypatch):
    from llavakit.cli import SHIPPED_MODEL, SHIPPED_MODEL_NAME
    from llavakit.weights import SHIPPED_MODELS, resolve_model_dir

    assert SHIPPED_MODELS[SHIPPED_MODEL_NAME] == SHIPPED_MODEL  # the CLI's copy of the path (it imports no torch)
    assert llavakit.load("llava-shapes").folder == SHIPPED_MODEL
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llava-shapes").mkdir()
    assert resolve_model_dir("llava-shapes") == Path("llava-shapes")  # a folder of that name wins, as documented


def test_chat_takes_the_name_and_threads():
    args = ["chat", "--model", "llava-shapes", "--image", str(EXAMPLES / "picture.png"), "--max-new-tokens", "8",
            "How many shapes are there?"]
    env = _env_without_thread_settings()
    res = subprocess.run([sys.executable, "-c", THREADS_PROBE, *args], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3"
    assert "threads=1" in res.stderr  # auto: one thread for a model this small
    res = subprocess.run([sys.executable, "-c", THREADS_PROBE, *args, "--threads", "3"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "threads=3" in res.stderr


def test_threads_auto_and_bad_values(monkeypatch):
    from llavakit.cli import default_threads, main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCH_NUM_THREADS", raising=False)
    assert default_threads(3_800_000) == 1
    assert default_threads(900_000_000) is None  # torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert default_threads(3_800_000) is None  # the environment's choice wins
    assert main(["chat", "--threads", "0", "hi"]) == 2  # refused before anything loads


def test_serve_without_model_serves_llava_shapes(tmp_path):
    import http.client
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLAVAKIT_API_KEY": "test-key"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llavakit", "serve", "--port", str(port),
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)

    def get(path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if get("/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert get("/v1/models")[0] == 401  # the key came from $LLAVAKIT_API_KEY
        status, body = get("/v1/models", {"Authorization": "Bearer test-key"})
        assert status == 200
        assert [m["id"] for m in json.loads(body)["data"]] == ["llava-shapes"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_train_without_model_fine_tunes_llava_shapes(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "picture.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "3"}]}) + "\n")
    res = _run(["train", "--data", str(data), "--image-folder", str(EXAMPLES), "--out", str(tmp_path / "out"),
                "--max-steps", "1", "--batch-size", "1"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["steps"] == 1
    shipped = json.loads((llavakit.load("llava-shapes").folder / "config.json").read_text())
    trained = json.loads((tmp_path / "out" / "config.json").read_text())
    assert trained["text_config"]["hidden_size"] == shipped["text_config"]["hidden_size"]
    assert trained["model_type"] == shipped["model_type"]


def test_convert_reads_the_name(tmp_path):
    from llavakit.cli import main

    assert main(["convert", "--to", "original", "llava-shapes", str(tmp_path / "orig")]) == 0
    assert (tmp_path / "orig" / "config.json").is_file()


def test_parser_defaults_match_the_library():
    import dataclasses

    from llavakit import cli
    from llavakit.random_init import PRESETS
    from llavakit.train.loop import STAGES, TrainConfig

    # The parser keeps copies of these (the modules defining them import torch); they must not drift.
    assert cli.RANDOM_PRESETS == tuple(PRESETS)
    assert cli.TRAIN_STAGES == STAGES
    args = cli._parser().parse_args(["train", "--data", "d.jsonl", "--out", "o"])
    defaults = TrainConfig()
    compared = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]
    assert len(compared) > 15
    assert {n: getattr(args, n) for n in compared} == {n: getattr(defaults, n) for n in compared}
    assert args.model is None  # cmd_train fills in llava-shapes


def test_help_shows_defaults_but_no_secret():
    res = _run(["serve", "--help"], env_extra={"LLAVAKIT_API_KEY": "sk-never-printed"})
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # argparse wraps lines anywhere
    assert "sk-never-printed" not in res.stdout
    assert "--port PORT default: 8000" in text and "requests decoded together (default: 16)" in text
    res = _run(["chat", "--help"])
    text = " ".join(res.stdout.split())
    assert "--max-new-tokens MAX_NEW_TOKENS default: 256" in text
    assert "--threads N torch threads (default: auto" in text
