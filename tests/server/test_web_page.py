"""The web chat page at `/`, end to end: a live `llavakit serve` driven through headless Chromium.

One server with the default model (and a small --max-image-pixels and --max-body-bytes, so that
an oversized image or message is refused), plus the server tests' OneVision server for video; one
browser, and each test opens the page in a fresh browser context (so a fresh localStorage). Playwright's request
interception records every chat request the page sends (and, where a test needs long answers,
adds `ignore_eos`). Screenshots of every step go to $LLAVAKIT_SCREENSHOTS, or a temporary folder.
Needs `playwright` (the test extra) and Debian's `chromium` on PATH; skipped without them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from server_helpers import Server, wait_for_metrics

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)
expect = sync_api.expect

PICTURE = Path(__file__).resolve().parents[2] / "examples" / "picture.png"
QUESTION = "How many shapes are there?"
MAX_IMAGE_PIXELS = 1_000_000  # examples/picture.png (96x96) passes, BIG_IMAGE does not
BIG_IMAGE = (1200, 1000)
MAX_BODY_BYTES = 1_000_000  # what the tests send fits; a noisy 700x700 PNG (about 1.5 MB) does not
ANSWER_TIMEOUT_MS = 30_000
STEP_TIMEOUT_MS = 10_000
PAGE_BUDGET_BYTES = 40_000
FAMILIES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}


def check_answer(answer: str) -> None:
    """What an answer to QUESTION about examples/picture.png must be: the shipped model counts its three shapes."""
    assert answer.strip() == "3", answer


# ───────────────────────────── fixtures ─────────────────────────────


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`llavakit serve` with the default model on a free port; stopped with SIGTERM at the end."""
    from llavakit.cli import default_model_dir

    log = tmp_path_factory.mktemp("web_page") / "server.log"
    s = Server(default_model_dir(), "web-page",
               ["--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-body-bytes", str(MAX_BODY_BYTES)], log)
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("LLAVAKIT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("web_page_screenshots")


class Chat:
    """The page in one browser context, with the chat requests it sent."""

    def __init__(self, page, live: Server, shots: Path, prefix: str):
        self.page, self.live, self.shots, self.prefix = page, live, shots, prefix
        self.requests: list[dict] = []  # bodies of POST /v1/chat/completions, as the page sent them
        self.ignore_eos = False  # add ignore_eos to the requests (long answers from any model)
        self.problems: list[str] = []  # page errors, CSP violations, requests leaving the server
        self.step = 0
        page.route("**/v1/chat/completions", self._intercept)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)
        page.on("request", self._request)

    def _intercept(self, route):
        body = json.loads(route.request.post_data)
        self.requests.append(body)
        if self.ignore_eos:
            route.continue_(post_data=json.dumps(dict(body, ignore_eos=True)))
        else:
            route.continue_()

    def _console(self, msg):
        # Chromium logs every 4xx response as "Failed to load resource"; the error tests cause those.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.problems.append(f"console error: {msg.text}")

    def _request(self, request):
        if not request.url.startswith((self.live.url + "/", "data:", "blob:")):
            self.problems.append(f"request outside the server: {request.url}")

    def shot(self, name: str) -> None:
        self.step += 1
        self.page.screenshot(path=str(self.shots / f"{self.prefix}-{self.step:02d}-{name}.png"), full_page=True)

    # -- actions -------------------------------------------------------------------------------
    def set_setting(self, label: str, value) -> None:
        settings = self.page.locator("#settings")
        if settings.get_attribute("open") is None:
            self.page.get_by_text("Settings", exact=True).click()
        self.page.get_by_label(label).fill(str(value))

    def ask(self, text: str) -> None:
        box = self.page.get_by_label(re.compile("^Message"))
        box.fill(text)
        box.press("Enter")

    def answers(self):
        return self.page.locator(".msg.assistant")

    def wait_answer(self, index: int = -1, status: str = "done") -> str:
        """The text of answer `index` once it has `status` (done, stopped, error)."""
        answer = self.answers().nth(index if index >= 0 else self.answers().count() - 1)
        expect(answer).to_have_attribute("data-status", re.compile("^(done|stopped|error)$"),
                                         timeout=ANSWER_TIMEOUT_MS)
        assert answer.get_attribute("data-status") == status, answer.inner_text()
        return answer.locator(".answer").inner_text()

    def attach(self, path_or_png) -> None:
        self.page.locator("#files").set_input_files(path_or_png)

    def error(self, index: int):
        """(sentence, detail) of the error shown for answer `index`."""
        error = self.page.locator(".msg.assistant").nth(index).locator(".error")
        expect(error).to_be_visible()
        detail = error.locator(".detail")
        return error.locator(".message").inner_text(), detail.inner_text() if detail.count() else ""

    def fake_answers(self, handler):
        """Answer the page's chat requests with `handler(route)` instead of the server (None: the server again)."""
        if getattr(self, "_fake", None):
            self.page.unroute("**/v1/chat/completions", self._fake)
        self._fake = handler
        if handler:
            self.page.route("**/v1/chat/completions", handler)  # the latest route is tried first


@pytest.fixture
def chat(browser, live, shots, request):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    c = Chat(page, live, shots, request.node.name.removeprefix("test_")[:40])
    page.goto(live.url + "/")
    expect(page.locator("#model")).to_contain_text("web-page")
    yield c
    context.close()
    assert not c.problems, c.problems


def png_file(size: tuple[int, int], name: str, noise: bool = False) -> dict:
    """A PNG file for set_input_files: one colour, or random pixels (which PNG cannot compress)."""
    buf = io.BytesIO()
    if noise:
        Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buf, "PNG")
    else:
        Image.new("RGB", size, (200, 40, 40)).save(buf, "PNG")
    return {"name": name, "mimeType": "image/png", "buffer": buf.getvalue()}


def shows_a_frame(video) -> bool:
    """Whether a <video> has decoded a frame that is not blank (its pixels drawn to a canvas)."""
    return video.evaluate("""(v) => {
        if (v.readyState < 2 || !v.videoWidth) return false;
        const c = document.createElement("canvas");
        c.width = v.videoWidth; c.height = v.videoHeight;
        const g = c.getContext("2d");
        g.drawImage(v, 0, 0);
        const px = g.getImageData(0, 0, c.width, c.height).data;
        for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] > 60) return true;
        return false;
    }""")


def user_texts(messages: list[dict]) -> list[str]:
    """The text of each message (a string, or its text parts joined)."""
    out = []
    for m in messages:
        c = m["content"]
        out.append(c if isinstance(c, str) else "".join(p["text"] for p in c if p["type"] == "text"))
    return out


# ───────────────────────────── tests ─────────────────────────────


def test_page_is_self_contained_small_and_labelled(live, chat):
    status, body, headers = live.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp and "http" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    html = body.decode()
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]
    total = len(body)
    for path in assets:
        status, data, hdrs = live.request("GET", path)
        assert status == 200, path
        total += len(data)
    assert total < PAGE_BUDGET_BYTES, f"the page weighs {total} bytes"
    assert "innerHTML" not in live.request("GET", "/static/app.js")[1].decode()  # text only via textContent

    page = chat.page
    card = json.loads(live.get("/v1/models")[1])["data"][0]
    family = FAMILIES[card["model_type"]]
    expect(page).to_have_title("llavakit chat")
    expect(page.locator("#model")).to_have_text(f"web-page · {family} · context {card['max_model_len']} tokens")
    video = "video" in card["input_modalities"]
    assert page.locator("#files").get_attribute("accept") == ("image/*,video/*" if video else "image/*")
    for label in ("Temperature", "Top-p", "Max tokens"):
        expect(page.get_by_label(label)).to_be_attached()
    assert page.get_by_label("Temperature").input_value() == "0"
    expect(page.get_by_label(re.compile("^Message"))).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(page.get_by_role("log", name="Conversation")).to_be_visible()
    # keyboard: Tab reaches the file input (its label is the visible button); Shift+Enter is a new line
    page.get_by_label(re.compile("^Message")).focus()
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "files"
    box = page.get_by_label(re.compile("^Message"))
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two" and not chat.requests
    chat.shot("desktop")
    page.set_viewport_size({"width": 375, "height": 700})
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    expect(page.get_by_role("button", name="Send")).to_be_in_viewport()
    chat.shot("phone")


def test_image_question_streams_an_answer_then_a_second_turn_sends_the_whole_conversation(chat):
    page = chat.page
    chat.attach(PICTURE)
    expect(page.locator("#attachments img")).to_have_count(1)
    chat.attach(PICTURE)
    expect(page.locator("#attachments img")).to_have_count(2)
    page.get_by_role("button", name="Remove picture.png").first.click()  # a remove button on each thumbnail
    expect(page.locator("#attachments img")).to_have_count(1)
    chat.shot("attached")
    chat.ask(QUESTION)
    first = chat.wait_answer(0)
    check_answer(first)
    expect(page.locator("#attachments li")).to_have_count(0)
    stats = page.locator(".stats").nth(0).inner_text()
    assert re.search(r"\d+ prompt tokens · \d+ completion tokens · [\d.]+ tokens/s · time to first token "
                     r"[\d.]+ s", stats), stats
    sent = chat.requests[0]
    assert sent["model"] == "web-page" and sent["stream"] is True and sent["temperature"] == 0
    assert sent["stream_options"] == {"include_usage": True}
    parts = sent["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PICTURE.read_bytes()).decode()

    # Each answer has a Copy button; it puts the answer's text on the clipboard and says so.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat.live.url)
    copy = page.get_by_role("button", name="Copy answer")
    expect(copy).to_have_count(1)
    copy.click()
    expect(page.locator(".msg.assistant .copied").nth(0)).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == first
    chat.shot("first-answer")

    # Second turn; model and user text is shown as text, never parsed as HTML.
    tricky = '<img src=x onerror="window.__pwned = 1">Which <b>colour</b> is it? & why'
    chat.ask(tricky)
    second = chat.wait_answer(1)
    assert second.strip()  # a question outside the shapes world: any answer, shown as text
    messages = chat.requests[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0] == sent["messages"][0]
    assert messages[1]["content"] == first
    assert messages[2]["content"] == tricky
    user = page.locator(".msg.user .text").nth(1)
    assert user.inner_text() == tricky and user.locator("img, b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".answer").nth(0).inner_text() == first  # earlier turns stay as they were
    expect(page.get_by_role("button", name="Copy answer")).to_have_count(2)
    page.get_by_role("button", name="Copy answer").nth(1).click()
    expect(page.locator(".msg.assistant .copied").nth(1)).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == second
    chat.shot("second-answer")


def test_stop_ends_the_stream_and_the_server_aborts_the_request(chat, live):
    page = chat.page
    before = live.metrics().get("llavakit_engine_requests_aborted", 0)
    context = json.loads(live.get("/v1/models")[1])["data"][0]["max_model_len"]
    chat.ignore_eos = True
    chat.set_setting("Max tokens", min(4000, context - 100))  # no image: the longest answer the context allows
    chat.ask("Count to a thousand, slowly.")
    answer = page.locator(".answer").nth(0)
    lengths = []
    deadline = time.monotonic() + ANSWER_TIMEOUT_MS / 1000
    while time.monotonic() < deadline and len(set(lengths) - {0}) < 3:
        lengths.append(len(answer.inner_text()))
        time.sleep(0.05)
    assert len(set(lengths) - {0}) >= 3 and lengths == sorted(lengths), f"the answer did not stream: {lengths}"
    assert page.locator("#send").is_hidden()
    # At once: a tiny model writes the whole answer in a few seconds (Stop hides when it is done).
    page.get_by_role("button", name="Stop").click(timeout=3000)
    stopped_at = len(chat.wait_answer(0, status="stopped"))
    time.sleep(0.5)
    assert len(answer.inner_text()) == stopped_at, "the answer kept growing after Stop"
    expect(page.locator(".stats").nth(0)).to_contain_text("stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    m = wait_for_metrics(live, lambda m: m["llavakit_running_requests"] == 0 and m["llavakit_choices_in_flight"] == 0
                     and m.get("llavakit_engine_requests_aborted", 0) > before, timeout=10.0)
    assert m["llavakit_running_requests"] == 0 and m["llavakit_choices_in_flight"] == 0
    assert m.get("llavakit_engine_requests_aborted", 0) > before, "the server did not abort the request"
    chat.shot("stopped")

    # Regenerate re-asks the same question, in a short answer this time.
    chat.ignore_eos = False
    chat.set_setting("Max tokens", 16)
    page.get_by_role("button", name="Regenerate").click()
    chat.wait_answer(0)
    assert chat.requests[1]["messages"] == chat.requests[0]["messages"]
    assert chat.requests[1]["max_tokens"] == 16
    chat.shot("regenerated")
    page.get_by_role("button", name="Clear conversation").click()
    expect(page.locator(".exchange")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()


def test_errors_are_shown_and_the_conversation_survives_them(chat):
    page = chat.page
    # An image over --max-image-pixels: the server's message is shown; Edit brings the turn back.
    chat.attach(png_file(BIG_IMAGE, "big.png"))
    chat.ask(QUESTION)
    chat.wait_answer(0, status="error")
    # The server's message as a sentence; the status and the field at fault small beside it.
    w, h = BIG_IMAGE
    assert chat.error(0) == (f"The image is {w}x{h} = {w * h} pixels, more than this server's limit of "
                             f"{MAX_IMAGE_PIXELS}; send a smaller image.",
                             "HTTP 400 Bad Request · messages[0].content[0].image_url")
    assert page.locator(".error").nth(0).get_attribute("title") == chat.error(0)[1]
    chat.shot("image-too-large")
    page.get_by_role("button", name="Edit").click()
    expect(page.locator(".exchange")).to_have_count(0)
    assert page.get_by_label(re.compile("^Message")).input_value() == QUESTION
    page.get_by_role("button", name="Remove big.png").click()
    chat.attach(PICTURE)
    page.get_by_role("button", name="Send").click()
    first = chat.wait_answer(0)
    check_answer(first)
    assert len(chat.requests[1]["messages"]) == 1
    chat.shot("edited-and-answered")

    # max_tokens beyond the context: the error shows, Retry with a smaller one answers.
    chat.set_setting("Max tokens", 100000)
    chat.ask("And now?")
    chat.wait_answer(1, status="error")
    message, detail = chat.error(1)
    assert message.startswith("This model's context is ") and re.search(r"Lower max_tokens to at most \d+\.$", message)
    assert detail == "HTTP 400 Bad Request · max_tokens", detail
    assert page.locator(".answer").nth(0).inner_text() == first
    chat.shot("max-tokens-too-large")
    chat.set_setting("Max tokens", 16)
    page.get_by_role("button", name="Retry").click()
    chat.wait_answer(1)
    expect(page.locator(".msg.assistant .error:visible")).to_have_count(0)
    assert user_texts(chat.requests[-1]["messages"]) == [QUESTION, first, "And now?"]

    # A failed turn left in place is not sent with the next question.
    chat.set_setting("Max tokens", 100000)
    chat.ask("This one fails.")
    chat.wait_answer(2, status="error")
    chat.set_setting("Max tokens", 16)
    chat.ask("This one works.")
    chat.wait_answer(3)
    texts = user_texts(chat.requests[-1]["messages"])
    assert "This one fails." not in texts and texts[-1] == "This one works." and len(texts) == 5
    chat.shot("after-errors")


def test_too_large_busy_and_unreachable_read_as_sentences(chat):
    page = chat.page
    # A real 413: a message over --max-body-bytes.
    chat.attach(png_file((700, 700), "noise.png", noise=True))
    chat.ask(QUESTION)
    chat.wait_answer(0, status="error")
    limit_mb = round(MAX_BODY_BYTES / 2**20, 1)
    assert chat.error(0) == (f"The attachments are too large for this server (at most {limit_mb:g} MB a message): "
                             "send smaller or fewer of them.", "HTTP 413 Request Entity Too Large")
    chat.shot("too-large")

    # 429 and 503 (as the server sends them, with Retry-After), and no answer at all.
    def busy(status, reason, retry):
        return lambda route: route.fulfill(status=status, headers={"Retry-After": retry}, content_type="application/json",
                                           body=json.dumps({"error": {"message": reason, "type": "x", "code": None}}))
    chat.fake_answers(busy(429, "too many requests in flight (64); retry shortly.", "3"))
    chat.ask("Busy?")
    chat.wait_answer(1, status="error")
    assert chat.error(1) == ("The server is busy; try again in 3 s.", "HTTP 429 Too Many Requests")
    chat.fake_answers(busy(503, "the server is shutting down", "1"))
    page.get_by_role("button", name="Retry").click()
    chat.wait_answer(1, status="error")
    assert chat.error(1) == ("The server is busy; try again in 1 s.", "HTTP 503 Service Unavailable")
    chat.fake_answers(lambda route: route.abort("connectionrefused"))
    page.get_by_role("button", name="Retry").click()
    chat.wait_answer(1, status="error")
    message, _ = chat.error(1)
    assert message.startswith("Could not reach the server") and message.endswith("."), message
    chat.shot("unreachable")
    chat.fake_answers(None)
    page.get_by_role("button", name="Retry").click()
    assert chat.wait_answer(1).strip()
    expect(page.locator(".msg.assistant").nth(1).locator(".error")).to_be_hidden()


def test_the_conversation_survives_a_reload_and_clear_forgets_it(chat):
    page = chat.page
    chat.attach(PICTURE)
    chat.ask(QUESTION)
    first = chat.wait_answer(0)
    check_answer(first)
    page.reload()
    expect(page.locator("#model")).to_contain_text("web-page")
    expect(page.locator(".exchange")).to_have_count(1)
    expect(page.locator(".msg.user .text")).to_have_text(QUESTION)
    expect(page.locator(".msg.user img")).to_have_count(1)
    assert page.locator(".msg.user img").evaluate("(img) => img.complete && img.naturalWidth") == 96
    assert chat.wait_answer(0) == first
    expect(page.locator(".stats").nth(0)).to_contain_text("completion tokens")
    expect(page.locator("#empty")).to_be_hidden()
    chat.shot("reloaded")

    # The follow-up sends the whole conversation, the restored image included.
    chat.ask("And now?")
    chat.wait_answer(1)
    messages = chat.requests[-1]["messages"]
    assert messages[0] == chat.requests[0]["messages"][0] and messages[1] == {"role": "assistant", "content": first}
    assert user_texts(messages) == [QUESTION, first, "And now?"]

    page.get_by_role("button", name="Clear conversation").click()
    expect(page.locator(".exchange")).to_have_count(0)
    page.reload()
    expect(page.locator("#model")).to_contain_text("web-page")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator(".exchange")).to_have_count(0)
    assert page.evaluate("localStorage.length") == 0
    chat.shot("cleared-and-reloaded")


def test_a_full_browser_storage_keeps_the_texts_without_the_media(chat):
    page = chat.page
    # localStorage refuses anything holding a data URL, as a full one would.
    page.add_init_script("""(() => {
        const setItem = Storage.prototype.setItem;
        Storage.prototype.setItem = function (key, value) {
            if (String(value).includes("data:")) throw new DOMException("full", "QuotaExceededError");
            return setItem.call(this, key, value);
        };
    })()""")
    page.reload()
    expect(page.locator("#model")).to_contain_text("web-page")
    chat.attach(PICTURE)
    chat.ask(QUESTION)
    first = chat.wait_answer(0)
    expect(page.locator("#notice")).to_contain_text("only the texts will be left")
    page.reload()
    expect(page.locator("#model")).to_contain_text("web-page")
    expect(page.locator(".msg.user .text")).to_have_text(QUESTION)
    expect(page.get_by_role("img", name="Image: picture.png (not kept)")).to_be_visible()
    assert chat.wait_answer(0) == first
    chat.shot("media-not-kept")
    chat.ask("And now?")
    chat.wait_answer(1)
    assert chat.requests[-1]["messages"][:2] == [{"role": "user", "content": QUESTION},
                                                 {"role": "assistant", "content": first}]


def test_drop_and_paste_attach_images_and_unsupported_files_are_refused(chat):
    page = chat.page
    picture = base64.b64encode(PICTURE.read_bytes()).decode()
    dispatch = """([kind, b64, name, type]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type}));
        const target = document.getElementById(kind === "paste" ? "prompt" : "log");
        if (kind === "paste") {
            target.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
            return;
        }
        for (const name of ["dragenter", "dragover", "drop"])
            target.dispatchEvent(new DragEvent(name, {dataTransfer: data, bubbles: true, cancelable: true}));
    }"""
    page.evaluate(dispatch, ["drop", picture, "dropped.png", "image/png"])
    expect(page.locator("#attachments img")).to_have_count(1)
    expect(page.locator("#drop")).to_be_hidden()
    page.evaluate(dispatch, ["paste", picture, "image.png", "image/png"])
    expect(page.locator("#attachments img")).to_have_count(2)
    expect(page.get_by_role("button", name="Remove dropped.png")).to_be_visible()
    chat.shot("dropped-and-pasted")
    if "video" not in json.loads(chat.live.get("/v1/models")[1])["data"][0]["input_modalities"]:
        page.evaluate(dispatch, ["drop", "AAAA", "clip.mp4", "video/mp4"])
        expect(page.locator("#notice")).to_contain_text("clip.mp4: this model takes images only, not video.")
    page.evaluate(dispatch, ["drop", "AAAA", "notes.txt", "text/plain"])
    expect(page.locator("#notice")).to_contain_text("notes.txt is not an image or a video.")
    expect(page.locator("#attachments li")).to_have_count(2)
    chat.ask("")  # attachments alone are a message
    chat.wait_answer(0)
    assert [p["type"] for p in chat.requests[0]["messages"][0]["content"]] == ["image_url", "image_url"]
    chat.shot("images-only-message")


def test_video_model_takes_a_video(browser, server, shots, request):
    from server_helpers import mp4_bytes

    s = server("onevision")  # the server tests' OneVision server (shared with them when run together)
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        chat = Chat(page, s, shots, "video")
        page.goto(s.url + "/")
        expect(page.locator("#model")).to_contain_text("onevision · LLaVA-OneVision")
        assert page.locator("#files").get_attribute("accept") == "image/*,video/*"
        expect(page.locator("label.attach")).to_contain_text("Add image or video")
        # A clip this browser cannot decode gets a labelled box instead of a blank square.
        chat.attach({"name": "broken.mp4", "mimeType": "video/mp4", "buffer": b"not a video"})
        expect(page.get_by_role("img", name="Video: broken.mp4 (no preview)")).to_be_visible()
        page.get_by_role("button", name="Remove broken.mp4").click()
        clip = mp4_bytes()
        chat.attach({"name": "clip.mp4", "mimeType": "video/mp4", "buffer": clip})
        expect(page.locator("#attachments video")).to_have_count(1)
        # The preview shows a frame of the clip, not a blank square.
        preview = page.get_by_label("Video: clip.mp4")
        page.wait_for_function("(v) => v.readyState >= 2 && v.videoWidth > 0", arg=preview.element_handle())
        assert shows_a_frame(preview)
        chat.shot("attached")
        chat.set_setting("Max tokens", 8)
        chat.ask("What happens in the video?")
        chat.wait_answer(0)
        sent = page.locator(".msg.user video")
        expect(sent).to_have_count(1)
        page.wait_for_function("(v) => v.readyState >= 2 && v.videoWidth > 0", arg=sent.element_handle())
        assert shows_a_frame(sent)
        chat.shot("answered")
        part = chat.requests[0]["messages"][0]["content"][0]
        url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
        assert part == {"type": "video_url", "video_url": {"url": url}}
        assert not chat.problems, chat.problems
    finally:
        context.close()


def test_page_asks_for_the_api_key_when_the_server_wants_one(browser, shots, tmp_path_factory):
    from llavakit.cli import default_model_dir

    key = "page-key-42"
    s = Server(default_model_dir(), "keyed", ["--api-key", key], tmp_path_factory.mktemp("keyed") / "server.log")
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        chat = Chat(page, s, shots, "api-key")
        page.goto(s.url + "/")
        expect(page.locator("#model")).to_have_text("This server needs an API key.")
        field = page.get_by_label("This server needs an API key")
        expect(field).to_be_visible()
        chat.shot("asks-for-key")
        field.fill("wrong")
        page.get_by_role("button", name="Use key").click()
        expect(field).to_be_visible()  # refused: asked again
        field.fill(key)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#model")).to_contain_text("keyed · LLaVA-OneVision")
        expect(page.locator("#key-form")).to_be_hidden()
        chat.attach(str(PICTURE))
        chat.ask(QUESTION)
        check_answer(chat.wait_answer(0))
        chat.shot("answered-with-key")
        assert not chat.problems, chat.problems
    finally:
        context.close()
        assert s.stop() == 0, s.log_tail()
