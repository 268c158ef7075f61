"""The interactive chat (llavakit/repl.py): its parts without a terminal, then the shipped model
driven through a pseudo-terminal as a person drives it (arrow keys, Tab, Ctrl-C, Ctrl-D)."""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import pytest

from llavakit import repl
from llavakit.errors import PromptError
from llavakit.repl import (Conversation, LineReader, completions, history_path, parse_command, path_argument,
                           path_candidates, stream_answer)

try:
    import pexpect
except ImportError:  # the test extra brings it
    pexpect = None

ROOT = Path(__file__).resolve().parents[1]
terminal = pytest.mark.skipif(pexpect is None or sys.platform == "win32",
                              reason="needs pexpect (pip install pexpect) and a POSIX pseudo-terminal")
UP, TIMEOUT = "\x1b[A", 60  # the arrow key as a terminal sends it; seconds for any one expectation


# -- commands -----------------------------------------------------------------------------------------
def test_parse_command():
    assert parse_command("How many shapes?") is None
    assert parse_command("  //etc is a folder ") is None  # "//" sends a message that starts with "/"
    assert repl.message_text("  //etc is a folder ") == "/etc is a folder"
    assert parse_command("/image my pic.png") == ("image", "my pic.png")
    assert parse_command("  /IMAGE   a.png ") == ("image", "a.png")
    assert parse_command("/video\tclip.mkv") == ("video", "clip.mkv")
    assert parse_command("/reset") == ("reset", "")
    assert parse_command("/exit") == ("quit", "") and parse_command("/clear") == ("reset", "")
    assert parse_command("/frobnicate now") == ("frobnicate", "now")


def test_path_argument_undoes_what_terminals_do_to_dropped_files():
    assert path_argument("'my pic.png'") == "my pic.png"
    assert path_argument('"my pic.png"') == "my pic.png"
    assert path_argument("my\\ pic.png") == "my pic.png"
    assert path_argument("~/a.png") == os.path.expanduser("~/a.png")


def test_help_and_hints():
    assert all(f"/{c}" in repl.help_text(video=True) for c in ("image PATH", "video PATH", "reset", "help", "quit"))
    assert "video checkpoints only: this one takes images only" in repl.help_text(video=False)
    assert repl.unknown_command_hint("imgae").startswith("unknown command /imgae: did you mean /image?")
    assert "\n" not in repl.unknown_command_hint("zzz") and "/help" in repl.unknown_command_hint("zzz")


# -- completion ---------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, monkeypatch):
    for name in ("pic.png", "picture.png", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_path_candidates(files):
    assert path_candidates("pic") == ["pic.png", "pics/", "picture.png"]  # folders end in "/"
    assert path_candidates("pics/") == ["pics/cat.png"]
    assert path_candidates("") == ["notes.txt", "pic.png", "pics/", "picture.png"]  # hidden files stay hidden...
    assert path_candidates(".h") == [".hidden.png"]  # ...unless asked for
    assert path_candidates(f"{files}/no") == [f"{files}/notes.txt"]
    assert path_candidates("missing/") == []


def test_completions_only_after_image_and_video(files):
    # readline cuts words at spaces and "/": it hands over the last part and replaces only that
    assert completions("/image pi", "pi") == ["pic.png", "pics/", "picture.png"]
    assert completions("/video pics/c", "c") == ["cat.png"]
    assert completions(f"/image {files}/pics/", "") == ["cat.png"]
    assert completions("tell me about pi", "pi") == []  # a message
    assert completions("/reset pi", "pi") == []
    assert completions("/re", "re") == ["reset "]  # the command's own name
    assert completions("/", "") == ["image ", "video ", "reset ", "help ", "quit "]


# -- history ------------------------------------------------------------------------------------------
def test_history_path():
    assert history_path({"XDG_STATE_HOME": "/state", "HOME": "/home/u"}) == Path("/state/llavakit/chat_history")
    home = Path(os.path.expanduser("~"))
    assert history_path({}) == home / ".local" / "state" / "llavakit" / "chat_history"
    assert history_path({"XDG_STATE_HOME": "relative/dir"}) == home / ".local" / "state" / "llavakit" / "chat_history"


class FakeReadline:
    """The part of the readline module LineReader uses, with files that fail on demand."""

    def __init__(self, fail_read=None, fail_write=None):
        self.items, self.fail_read, self.fail_write, self.written = [], fail_read, fail_write, []

    def set_auto_history(self, on): pass
    def set_history_length(self, n): self.length = n
    def set_completer(self, f): self.completer = f
    def set_completer_delims(self, d): pass
    def parse_and_bind(self, s): pass
    def get_current_history_length(self): return len(self.items)
    def get_history_item(self, i): return self.items[i - 1]
    def add_history(self, line): self.items.append(line)

    def read_history_file(self, path):
        if self.fail_read:
            raise self.fail_read

    def write_history_file(self, path):
        if self.fail_write:
            raise self.fail_write
        self.written.append(list(self.items))


def test_history_is_bounded_saved_per_line_without_repeats(tmp_path):
    rl = FakeReadline()
    reader = LineReader(tmp_path / "state" / "chat_history", rl)
    assert rl.length == repl.HISTORY_LENGTH
    for line in ("first", "first", "", "second"):
        reader.remember(line)
    assert rl.items == ["first", "second"] and len(rl.written) == 2
    assert (tmp_path / "state" / "chat_history").stat().st_mode & 0o077 == 0  # private to its owner


def test_history_failures_are_logged_not_fatal(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="llavakit.repl")
    rl = FakeReadline(fail_read=PermissionError("denied"), fail_write=OSError("disk full"))
    reader = LineReader(tmp_path / "chat_history", rl)
    reader.remember("a question")
    reader.remember("another")
    assert rl.items == ["a question", "another"]  # the session keeps its history in memory
    assert "not read" in caplog.text and caplog.text.count("not written") == 1  # then it stops trying
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    LineReader(blocked / "chat_history", FakeReadline()).remember("x")  # its folder cannot be made


def test_plain_input_without_readline_or_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped\n"))
    assert LineReader.open(Path("unused")).readline is None  # piped lines: no editing, no history
    monkeypatch.setattr(sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setitem(sys.modules, "readline", None)  # as on Windows without pyreadline3
    reader = LineReader.open(Path("unused"))
    assert reader.readline is None
    reader.remember("nothing happens")


# -- the conversation and Ctrl-C ----------------------------------------------------------------------
@pytest.fixture
def picture_path():
    return str(ROOT / "examples" / "picture.png")


def _user(text, media):
    return {"role": "user", "content": [{"type": kind, kind: path} for kind, path in media]
            + [{"type": "text", "text": text}]}


def test_reset_says_what_it_cleared():
    conv = Conversation([], pending=[("image", "a.png")])
    conv.add(_user("q1", conv.pending), "a1")
    conv.add(_user("q2", []), "a2")
    conv.pending = [("image", "b.png"), ("video", "c.mkv")]
    assert conv.reset() == "Conversation cleared (2 turns, 2 images, 1 video)."
    assert conv.turns == [] and conv.pending == []
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    conv = Conversation(system)
    conv.add(_user("q", []), "a")
    assert conv.reset() == "Conversation cleared (1 turn). The system prompt stays."
    assert conv.messages(_user("next", []))[0] == system[0]


def _pieces(words, ctrl_c=None, closed=None):
    """An answer's pieces; ctrl_c {i: n}: Ctrl-C (a real SIGINT) is pressed n times while piece i is made."""
    try:
        for i, word in enumerate([*words, None]):  # None: the step that finds the end
            for _ in range((ctrl_c or {}).get(i, 0)):
                signal.raise_signal(signal.SIGINT)
            if isinstance(word, Exception):
                raise word
            if word is not None:
                yield word
    finally:
        if closed is not None:
            closed.append(True)  # the engine's request is aborted here


def test_stream_answer_stops_at_ctrl_c_between_tokens():
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN when started in the background
    out, closed = io.StringIO(), []
    assert stream_answer(_pieces(["a", " b", " c"]), out) == ("a b c", "finished")
    assert out.getvalue() == "a b c\n"
    out = io.StringIO()
    assert stream_answer(_pieces(["a", " b", " c", " d"], ctrl_c={1: 1}, closed=closed), out) == ("a b", "stopped")
    assert out.getvalue() == "a b\n" and closed == [True]
    # a second Ctrl-C does not wait for the next token
    closed = []
    assert stream_answer(_pieces(["a", " b", " c"], ctrl_c={1: 2}, closed=closed), io.StringIO()) == ("a", "cut")
    assert closed == [True]
    # Ctrl-C in the step that ended the answer anyway: the whole answer stands
    assert stream_answer(_pieces(["a", " b"], ctrl_c={2: 1}), io.StringIO()) == ("a b", "finished")
    # an error half-way ends the line first, so its message starts on its own
    out = io.StringIO()
    with pytest.raises(PromptError):
        stream_answer(_pieces(["a", PromptError("bad")]), out)
    assert out.getvalue() == "a\n"
    assert signal.getsignal(signal.SIGINT) is before  # restored


class FakeVLM:
    """Answers with `answers` in turn; records what it was asked."""

    class config:
        video_token_id = None

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def chat(self, messages, stream, sampling):
        self.asked.append(messages)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Script:
    """A LineReader that reads the given lines, then Ctrl-D."""

    def __init__(self, *lines):
        self.lines = list(lines)

    def read(self, prompt):
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    def remember(self, line):
        pass


def _session(vlm, *lines, attached=()):
    out, err = io.StringIO(), io.StringIO()
    status = repl.run(vlm, None, [], list(attached), _user, Script(*lines), out, err)
    return status, out.getvalue(), err.getvalue()


def test_ctrl_c_drops_the_turn_and_keeps_its_attachments(picture_path):
    vlm = FakeVLM(_pieces(["3", " or", " more"], ctrl_c={1: 1}), iter(["3"]), iter(["yes"]))
    status, out, err = _session(vlm, KeyboardInterrupt, "How many?", "How many?", "Sure?", "/reset",
                                attached=[("image", picture_path)])
    assert status == 0
    assert out == "3 or\n3\nyes\n"
    assert "[stopped: this question and its partial answer are left out of the conversation; " \
           "1 attachment waits for your next message]" in err
    assert vlm.asked[1] == [_user("How many?", [("image", picture_path)])]  # the stopped turn is gone
    assert len(vlm.asked[2]) == 3  # the answered one stays
    assert "Conversation cleared (2 turns, 1 image)." in err


def test_failures_and_commands_keep_the_session(picture_path):
    vlm = FakeVLM(PromptError("the image is broken"), iter(["fine"]))
    status, out, err = _session(vlm, f"/image {picture_path}", "look", "again", "/video clip.mkv", "/image",
                                "/image /no/such.png", "/imgae x", "/quit", "never read")
    assert status == 0 and out == "fine\n"
    assert "error: the image is broken" in err
    assert vlm.asked[1] == [_user("again", [])]  # the broken attachment was dropped with its turn
    assert "this checkpoint takes images only" in err and "usage: /image PATH" in err
    assert "error: no image file at '/no/such.png'" in err and "did you mean /image?" in err


# -- in a terminal, with the shipped model --------------------------------------------------------------


@pytest.fixture
def spawn():
    """spawn(state_dir, *flags): `llavakit chat --image examples/picture.png` in a pseudo-terminal, at
    its first prompt, with its history under state_dir; every session is ended after the test."""
    children = []

    def start(state: Path, *args: str):
        env = {**os.environ, "XDG_STATE_HOME": str(state), "TERM": "xterm", "HF_HUB_OFFLINE": "1"}
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps that:
        # the session gets Ctrl-C as a user's terminal delivers it, whatever started the tests.
        child = pexpect.spawn(sys.executable, ["-m", "llavakit", "chat", "--image", "examples/picture.png", *args],
                              cwd=ROOT, env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        children.append(child)
        child.expect_exact("/help lists the commands")
        child.expect_exact(">>> ")
        return child

    yield start
    for child in children:
        child.close(force=True)  # a no-op for a session that ended; ends one a failed expectation left


def _enter(child, line: str, *expected: str) -> None:
    """Type a line, see each expected text in turn, then the next prompt."""
    child.sendline(line)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact(">>> ")


def _leave(child) -> None:
    child.sendcontrol("d")  # on an empty line
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@terminal
def test_a_session_in_a_terminal(spawn, tmp_path):
    child = spawn(tmp_path)
    _enter(child, "How many shapes are there?", "\r\n3\r\n")
    # Up brings the question back; Ctrl-C clears the line and the session goes on
    child.send(UP)
    child.expect_exact("How many shapes are there?")
    child.sendintr()
    child.expect_exact(">>> ")
    _enter(child, "/help", "/image PATH", "/video PATH", "/reset", "/help", "/quit")
    _enter(child, "/reset", "Conversation cleared (1 turn, 1 image).")
    _enter(child, "/frob", "unknown command /frob:")
    # Tab completes the file name; Enter attaches it
    child.send("/image examples/pic\t")
    child.expect_exact("ture.png")
    _enter(child, "", "[attached examples/picture.png]")
    _leave(child)
    saved = (tmp_path / "llavakit" / "chat_history").read_text()
    assert "How many shapes are there?" in saved and "/image examples/picture.png" in saved


@terminal
def test_history_persists_and_ctrl_c_stops_a_long_answer(spawn, tmp_path):
    first = spawn(tmp_path)
    _enter(first, "/help", "/quit")
    first.sendline("/quit")
    first.expect(pexpect.EOF)
    first.close()
    assert first.exitstatus == 0
    # This answer runs to its 1500-token limit (a penalty below 1 keeps the model repeating).
    second = spawn(tmp_path, "--max-new-tokens", "1500", "--repetition-penalty", "0.9")
    second.send(UP)
    second.expect_exact("/quit")  # the last line of the first session
    second.send(UP)
    second.expect_exact("help")  # readline redraws only what differs from "/quit"
    second.sendintr()
    second.expect_exact(">>> ")
    second.sendline("a" * 36)
    second.expect_exact("square square")  # streamed: part of the answer is on screen...
    second.sendintr()  # ...when Ctrl-C stops it
    second.expect_exact("[stopped: this question and its partial answer are left out of the conversation; "
                        "1 attachment waits for your next message]", timeout=10)
    second.expect_exact(">>> ")
    _enter(second, "/reset", "Conversation cleared (0 turns, 1 image).")
    _leave(second)
