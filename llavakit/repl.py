"""The interactive terminal chat behind `llavakit chat` without a question.

It behaves like the REPLs people know (Python's, Ollama's, llama.cpp's):

    >>> How many shapes are there?        answers stream token by token
    3
    >>> /image ~/Pictures/c<Tab>          Tab completes paths after /image and /video
    >>> /reset                            "Conversation cleared (1 turn, 1 image)."

Keys: arrows edit the line and walk the history (standard-library `readline`; plain input() where it
is missing, e.g. Windows without pyreadline3), Ctrl-C stops an answer or clears the line, Ctrl-D on
an empty line leaves. History is kept across sessions in $XDG_STATE_HOME/llavakit/chat_history.

Everything that does not need a terminal is a plain function (parse_command, completions,
history_path) or a small class (Conversation), so it is tested without one. Answers go to stdout,
everything else (banner, help, notices, errors) to stderr, so `llavakit chat > answers.txt` keeps
only the answers.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

from .errors import LlavakitError

if TYPE_CHECKING:
    from .engine.sampling import SamplingParams

log = logging.getLogger(__name__)

PROMPT = ">>> "
HISTORY_LENGTH = 1000  # lines kept in the history file; older ones are dropped when it is written

# name -> (argument, what it does); /help prints them in this order.
COMMANDS = {
    "image": ("PATH", "attach an image file to your next message (Tab completes the path)"),
    "video": ("PATH", "attach a video file to your next message (video checkpoints only)"),
    "reset": ("", "clear the conversation and any pending attachments (the system prompt stays)"),
    "help": ("", "list these commands"),
    "quit": ("", "leave the chat (also /exit, or Ctrl-D on an empty line)"),
}
ALIASES = {"exit": "quit", "bye": "quit", "?": "help", "clear": "reset"}
KEYS = ("keys: Up/Down walk the history, Tab completes paths after /image and /video, Ctrl-C stops an "
        "answer or clears the line, Ctrl-D on an empty line leaves. Start a message with // to send a "
        "leading /.")

Media = list[tuple[str, str]]  # (kind, path) pairs, kind "image" or "video"


# -- pure helpers -----------------------------------------------------------------------------------
def parse_command(line: str) -> tuple[str, str] | None:
    """("image", "a b.png") for "/image a b.png"; None when the line is a message, not a command.

    The name is lower-cased and aliases (/exit, /clear, /?) map to their command; an unknown name
    comes back as it is, for the caller to answer with a hint. "//text" is a message ("/text").
    """
    line = line.strip()
    if not line.startswith("/") or line.startswith("//"):
        return None
    name, _, arg = line[1:].partition(" ")
    if "\t" in name:  # "/image\tpath": a Tab typed where readline is missing
        name, _, rest = name.partition("\t")
        arg = f"{rest} {arg}" if arg else rest
    name = name.lower()
    return ALIASES.get(name, name), arg.strip()


def message_text(line: str) -> str:
    """The text a non-command line sends: stripped, and "//x" unescaped to "/x"."""
    line = line.strip()
    return line[1:] if line.startswith("//") else line


def path_argument(arg: str) -> str:
    """The path an /image or /video argument names: terminals that drop a file onto the line quote
    it ('a b.png') or escape its spaces (a\\ b.png); both are undone, and ~ is expanded."""
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        arg = arg[1:-1]
    else:
        arg = arg.replace("\\ ", " ")
    return os.path.expanduser(arg)


def unknown_command_hint(name: str) -> str:
    """One line for /name when there is no such command: the closest one, and where the list is."""
    close = difflib.get_close_matches(name, list(COMMANDS) + list(ALIASES), n=1)
    guess = f"did you mean /{ALIASES.get(close[0], close[0])}? " if close else ""
    return f"unknown command /{name}: {guess}/help lists the commands (// starts a message with /)."


def help_text(video: bool) -> str:
    """The /help listing; `video` says whether this checkpoint takes video."""
    rows = []
    for name, (arg, what) in COMMANDS.items():
        if name == "video" and not video:
            what = "video checkpoints only: this one takes images only"
        rows.append(f"  /{name} {arg}".ljust(16) + what)
    return "commands:\n" + "\n".join(rows) + "\n" + KEYS


def history_path(environ: dict[str, str] | None = None) -> Path:
    """Where the chat history lives: $XDG_STATE_HOME/llavakit/chat_history, else
    ~/.local/state/llavakit/chat_history. A relative $XDG_STATE_HOME is ignored, as the XDG
    base-directory spec asks."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    base = Path(state) if state and os.path.isabs(state) else Path(os.path.expanduser("~")) / ".local" / "state"
    return base / "llavakit" / "chat_history"


def path_candidates(partial: str) -> list[str]:
    """Completions of a partly typed path: existing files and folders whose names start with its
    last part, folders with a trailing "/". Hidden names only when the last part starts with ".".
    Every candidate starts with `partial` exactly (its ~ is kept, only looked through)."""
    head = partial[: partial.rfind("/") + 1]  # up to and with the last "/"; "" in the current folder
    tail = partial[len(head):]
    folder = os.path.expanduser(head) if head else "."
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no such folder, or unreadable: nothing to offer
        return []
    out = []
    for name in names:
        if not name.startswith(tail) or (name.startswith(".") and not tail.startswith(".")):
            continue
        out.append(head + name + ("/" if os.path.isdir(os.path.join(folder, name)) else ""))
    return out


_PATH_COMMAND = re.compile(r"/(image|video)\s+", re.IGNORECASE)


def completions(buffer: str, text: str) -> list[str]:
    """What Tab offers. `buffer`: the line up to the cursor; `text`: its last word as readline cut it
    (it ends `buffer`). Paths after /image and /video, command names while the first word is typed,
    nothing in a message. Each candidate replaces `text`, so it starts with it."""
    match = _PATH_COMMAND.match(buffer)
    if match:
        partial, options = buffer[match.end():], path_candidates(buffer[match.end():])
    elif buffer.startswith("/") and not any(c.isspace() for c in buffer):
        partial, options = buffer, [f"/{name} " for name in COMMANDS if f"/{name}".startswith(buffer)]
    else:
        return []
    if not partial.endswith(text):  # readline cut the word somewhere unexpected: offer whole candidates
        return options
    # readline replaces only `text`, the end of `partial`: keep what it already holds.
    return [text + option[len(partial):] for option in options]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# -- the conversation --------------------------------------------------------------------------------
@dataclass
class Conversation:
    """The turns so far and the attachments waiting for the next message. `system` survives /reset."""

    system: list[dict]
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, in order
    pending: Media = field(default_factory=list)

    def messages(self, user: dict) -> list[dict]:
        """Everything the model sees for the next answer: system, turns, then `user`."""
        return self.system + self.turns + [user]

    def add(self, user: dict, answer: str) -> None:
        """Record a finished turn; the attachments it carried are no longer pending."""
        self.turns += [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.pending = []

    def reset(self) -> str:
        """Forget the turns and the pending attachments; say what went."""
        kinds = [part.get("type") for m in self.turns for part in m["content"]] + [k for k, _ in self.pending]
        users = sum(m["role"] == "user" for m in self.turns)
        what = [_plural(users, "turn")] + [_plural(kinds.count(k), k) for k in ("image", "video") if k in kinds]
        self.turns, self.pending = [], []
        stays = " The system prompt stays." if self.system else ""
        return f"Conversation cleared ({', '.join(what)}).{stays}"


# -- answering, with Ctrl-C ----------------------------------------------------------------------------
class _SigintLatch:
    """While an answer streams, the first Ctrl-C only asks it to stop at the next token.

    Raising KeyboardInterrupt at once would land anywhere inside the engine's step (mid-model,
    mid-bookkeeping); a latch lets the step finish and the request be aborted cleanly. A second
    Ctrl-C raises after all, for a step that takes too long (a big prompt on a slow machine).
    """

    def __init__(self):
        self.pressed = 0

    def __call__(self, signum, frame):
        self.pressed += 1
        if self.pressed > 1:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _latched_sigint() -> Iterator[_SigintLatch]:
    latch = _SigintLatch()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield latch
        return
    previous = signal.signal(signal.SIGINT, latch)
    try:
        yield latch
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_answer(pieces: Iterator[str], out: TextIO) -> tuple[str, str]:
    """Write an answer's pieces to `out` as they come; return (the text written, how it ended).

    How it ended: "finished"; "stopped" by Ctrl-C, between two tokens; "cut" by a second Ctrl-C,
    inside a step. The iterator is closed on the way out, which aborts its request in the engine.
    Errors of the iterator (LlavakitError) pass through, after the line is ended.
    """
    written: list[str] = []
    how, returned = "finished", False
    try:
        with _latched_sigint() as latch:
            try:
                for piece in pieces:
                    written.append(piece)
                    out.write(piece)
                    out.flush()
                    if latch.pressed:  # an answer that ended anyway, in the step Ctrl-C came in, is kept
                        how = "stopped"
                        break
            except KeyboardInterrupt:  # the second Ctrl-C
                how = "cut"
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
        returned = True
    finally:
        if returned or written:  # a half-written answer ends its line, so an error starts on its own
            out.write("\n")
            out.flush()
    return "".join(written), how


# -- the line reader -------------------------------------------------------------------------------------
class LineReader:
    """input() with readline's line editing, history kept in a file and Tab completion, where
    readline exists and both ends are a terminal; plain input() otherwise (pipes, Windows).

    History failures (a read-only home, a full disk) are logged at debug level and never end the chat.
    """

    def __init__(self, history: Path | None, readline_module=None):
        self.history = history
        self.readline = readline_module
        if self.readline is None:
            return
        rl = self.readline
        rl.set_auto_history(False)  # added by `remember`: no empty lines, no repeats in a row
        rl.set_history_length(HISTORY_LENGTH)
        rl.set_completer(self._complete)
        rl.set_completer_delims(" \t\n/")  # "/" too: Tab lists names, not whole paths, as shells do
        if "libedit" in (getattr(rl, "__doc__", "") or "") or getattr(rl, "backend", "") == "editline":
            rl.parse_and_bind("bind ^I rl_complete")  # macOS's libedit speaks another binding language
        else:
            rl.parse_and_bind("tab: complete")
        self._read_history()

    @classmethod
    def open(cls, history: Path) -> LineReader:
        """The reader for this process: readline and `history` when stdin and stdout are a terminal."""
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return cls(None)  # piped input is not typed: it gets no editing and is kept out of the history
        try:
            import readline
        except ImportError:  # Windows without pyreadline3: plain lines, no history
            return cls(None)
        try:
            return cls(history, readline)
        except Exception as e:  # a stand-in readline (pyreadline3) without some function: still chat
            log.debug("readline not usable (%s); reading plain lines", e)
            return cls(None)

    def read(self, prompt: str) -> str:
        """One line (raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C)."""
        return input(prompt)

    def remember(self, line: str) -> None:
        """Add a line to the history and save it now, so a closed terminal loses nothing."""
        rl = self.readline
        if rl is None or not line.strip():
            return
        n = rl.get_current_history_length()
        if n and rl.get_history_item(n) == line:  # items count from 1
            return
        rl.add_history(line)
        self._write_history()

    def _read_history(self) -> None:
        try:
            self.readline.read_history_file(str(self.history))
        except FileNotFoundError:  # the first session
            pass
        except OSError as e:
            log.debug("chat history not read from %s: %s", self.history, e)

    def _write_history(self) -> None:
        if self.history is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            if not self.history.exists():  # what people ask may be private: readable by its owner only
                self.history.touch(mode=0o600)
            self.readline.write_history_file(str(self.history))  # keeps the last HISTORY_LENGTH lines
        except OSError as e:
            log.debug("chat history not written to %s: %s", self.history, e)
            self.history = None  # one failure is enough; the session goes on without saving

    def _complete(self, text: str, state: int) -> str | None:
        # readline asks for candidate 0, 1, 2, ... until it gets None; compute them once, at 0.
        if state == 0:
            rl = self.readline
            try:
                self._matches = completions(rl.get_line_buffer()[: rl.get_endidx()], text)
            except Exception as e:  # readline swallows errors silently; leave a trace
                log.debug("completion failed: %s", e)
                self._matches = []
        return self._matches[state] if state < len(self._matches) else None


# -- the session -------------------------------------------------------------------------------------------
def run(vlm, sampling: SamplingParams, system: list[dict], attached: Media,
        user_message: Callable[[str, Media], dict], reader: LineReader | None = None,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Hold an interactive chat until /quit or Ctrl-D; return the exit status (0).

    vlm: a loaded `llavakit.VLM`; sampling: how every answer is generated; system: the system
    message (or none), kept across /reset; attached: media given on the command line, sent with the
    first message; user_message: builds a user turn from text and attachments. A turn that fails
    (a bad image, a prompt over the context) prints one line and the session goes on.

    Ctrl-C during an answer stops it and drops that turn: the question and the partial answer stay
    out of the conversation (Up brings the question back), and its attachments wait for the next
    message. A truncated answer kept in the context reads to the model as if it had chosen to stop
    there, and later answers follow its lead.
    """
    out, err = out or sys.stdout, err or sys.stderr
    reader = reader or LineReader.open(history_path())
    video = getattr(vlm.config, "video_token_id", None) is not None
    conv = Conversation(list(system), pending=list(attached))
    name = Path(str(getattr(vlm, "folder", "") or "the model")).name
    print(f"Chatting with {name}. /help lists the commands; /quit or Ctrl-D leaves.", file=err)
    for _, path in conv.pending:
        print(f"[attached {path}]", file=err)
    while True:
        try:
            line = reader.read(PROMPT)
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: readline dropped the line; start a fresh one
            print(file=err)
            continue
        reader.remember(line)
        try:
            if _turn(line, vlm, sampling, conv, user_message, video, out, err):
                return 0
        except KeyboardInterrupt:  # a Ctrl-C that fell between the answer's latch and the prompt
            print(file=err)


def _turn(line: str, vlm, sampling, conv: Conversation, user_message, video: bool, out, err) -> bool:
    """Act on one line; True when the session should end."""
    command = parse_command(line)
    if command is None:
        text = message_text(line)
        if text:
            _ask(text, vlm, sampling, conv, user_message, out, err)
        return False
    name, arg = command
    if name == "quit":
        return True
    if name == "help":
        print(help_text(video), file=err)
    elif name == "reset":
        print(conv.reset(), file=err)
    elif name in ("image", "video"):
        path = path_argument(arg)
        if not arg:
            print(f"usage: /{name} PATH (Tab completes the path)", file=err)
        elif name == "video" and not video:
            print("this checkpoint takes images only: /video needs a video checkpoint (LLaVA-OneVision).", file=err)
        elif not Path(path).is_file():
            print(f"error: no {name} file at {arg!r}", file=err)
        else:
            conv.pending.append((name, path))
            print(f"[attached {path}]", file=err)
    else:
        print(unknown_command_hint(name), file=err)
    return False


def _ask(text: str, vlm, sampling, conv: Conversation, user_message, out, err) -> None:
    message = user_message(text, conv.pending)
    try:
        pieces = vlm.chat(conv.messages(message), stream=True, sampling=sampling)  # reads the media now
        answer, how = stream_answer(pieces, out)
    except KeyboardInterrupt:  # Ctrl-C while the media were read: nothing reached the engine yet
        answer, how = "", "stopped"
        print(file=err)
    except LlavakitError as e:  # a bad image or a prompt too long ends this turn, not the session
        print(f"error: {e}", file=err)
        conv.pending = []  # the attachments that failed would fail every later turn too
        return
    if how == "finished":
        conv.add(message, answer)
        return
    if how == "cut":  # stopped inside a step: forget cached prefixes and features rather than trust them
        vlm.engine.clear_caches()
    n = len(conv.pending)
    waiting = f"; {_plural(n, 'attachment')} wait{'s' if n == 1 else ''} for your next message" if n else ""
    print(f"[stopped: this question and its partial answer are left out of the conversation{waiting}]", file=err)
