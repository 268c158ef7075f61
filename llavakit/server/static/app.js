// The llavakit chat page. It talks only to this server's OpenAI-compatible API:
//   GET /v1/models             model name, family, context length, whether it takes video
//   POST /v1/chat/completions  the whole conversation each turn, streamed (SSE) with usage
// Every model and user string reaches the page through textContent, never as HTML. The conversation
// is kept in this browser's localStorage (one copy per server and model) so that it survives a reload.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), clear: $("clear"), log: $("log"), empty: $("empty"), notice: $("notice"),
  form: $("composer"), attachments: $("attachments"), files: $("files"), attachLabel: $("attach-label"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), drop: $("drop"),
  temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  keyForm: $("key-form"), apiKey: $("api-key"),
};
const KEY_STORE = "llavakit-api-key";
const CHAT_STORE = "llavakit-chat";
const MIME = {
  png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp",
  bmp: "image/bmp", tif: "image/tiff", tiff: "image/tiff", mp4: "video/mp4", webm: "video/webm",
  mov: "video/quicktime", mkv: "video/x-matroska", avi: "video/x-msvideo",
};

const state = {
  model: null,      // the /v1/models card
  video: false,     // the model takes video_url parts
  pending: [],      // attachments of the message being written: {kind, name, url}
  exchanges: [],    // {text, media, answer, status, error, errorDetail, stats, el: {...}}
  controller: null, // AbortController of the answer being streamed
  mediaDropped: false, // the stored copy had to leave the attachments out (storage full)
};

// ───────────────────────────── small helpers ─────────────────────────────

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

let noticeTimer = 0;
function notice(text) {
  ui.notice.textContent = text;
  clearTimeout(noticeTimer);
  if (text) noticeTimer = setTimeout(() => { ui.notice.textContent = ""; }, 8000);
}

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) ui.log.scrollTop = ui.log.scrollHeight;
}

function readDataURL(file, mime) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^;,]*/, "data:" + mime));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// A box with a few words where a preview cannot be shown.
function placeholder(item, why, words) {
  const kind = item.kind === "video" ? "Video" : "Image";
  return el("span", { class: "missing", role: "img", "aria-label": `${kind}: ${item.name} (${why})`, title: item.name,
    textContent: `${kind} ${words}` });
}

function thumb(item) {
  const label = `${item.kind === "video" ? "Video" : "Image"}: ${item.name}`;
  if (!item.url) return placeholder(item, "not kept", "not kept"); // left out of the stored conversation
  if (item.kind === "video") {
    const video = el("video", { src: item.url, muted: true, playsInline: true, preload: "metadata", title: label,
      "aria-label": label });
    // Some browsers paint nothing until asked for a frame: seeking a little into the clip decodes one.
    video.addEventListener("loadedmetadata", () => { video.currentTime = Math.min(0.1, video.duration / 2 || 0); },
      { once: true });
    // A codec this browser lacks: say so rather than leave an empty square (the server may still read it).
    video.addEventListener("error", () => video.replaceWith(placeholder(item, "no preview", "(no preview)")));
    return video;
  }
  return el("img", { src: item.url, alt: label, title: item.name });
}

function mediaItem(item) {
  return el("li", { class: item.kind }, thumb(item));
}

// ───────────────────────────── the API key ─────────────────────────────

// A server started with --api-key answers 401 on /v1/*; the page then asks for the key and keeps
// it for this browser tab only (sessionStorage), sending it as a Bearer token.
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey(message) {
  ui.keyForm.hidden = false;
  ui.apiKey.focus();
  notice(message);
}

ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  ui.apiKey.value = "";
  ui.keyForm.hidden = true;
  loadModel();
});

// ───────────────────────────── the model ─────────────────────────────

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    if (res.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      ui.model.textContent = "This server needs an API key.";
      askForKey("Enter the server's API key to chat.");
      return;
    }
    if (!res.ok) throw await apiError(res);
    const card = (await res.json()).data[0];
    state.model = card;
    state.video = (card.input_modalities || []).includes("video");
    const family = card.family || card.model_type || "unknown family";  // the server names its family
    const parts = [card.id, family];
    if (card.max_model_len) parts.push(`context ${card.max_model_len} tokens`);
    ui.model.textContent = parts.join(" · ");
    if (card.max_model_len) ui.maxTokens.max = card.max_model_len;
    if (state.video) {
      ui.files.accept = "image/*,video/*";
      ui.attachLabel.textContent = "Add image or video";
    }
  } catch (e) {
    const err = asApiError(e);
    ui.model.textContent = `Could not read the model from /v1/models. ${err.message}`;
    ui.model.title = err.detail;
    return;
  }
  restoreConversation();
}

// ───────────────────────────── attachments ─────────────────────────────

async function addFiles(files) {
  for (const file of files) {
    const ext = (file.name || "").split(".").pop().toLowerCase();
    const mime = file.type || MIME[ext] || "";
    const kind = mime.startsWith("image/") ? "image" : mime.startsWith("video/") ? "video" : null;
    const name = file.name || `pasted ${kind || "file"}`;
    if (!kind) { notice(`${name} is not an image or a video.`); continue; }
    if (kind === "video" && !state.video) { notice(`${name}: this model takes images only, not video.`); continue; }
    if (kind === "video" && state.pending.some((a) => a.kind === "video")) {
      notice("Attach at most one video per message."); continue;
    }
    try {
      state.pending.push({ kind, name, url: await readDataURL(file, mime) });
    } catch (e) {
      notice(`Could not read ${name}: ${e.message}`);
    }
  }
  renderPending();
}

function renderPending() {
  ui.attachments.replaceChildren(...state.pending.map((item, i) => {
    const remove = el("button", { type: "button", class: "remove", textContent: "×", title: "Remove",
      "aria-label": `Remove ${item.name}` });
    remove.addEventListener("click", () => {
      state.pending.splice(i, 1);
      renderPending();
      const next = ui.attachments.querySelector(".remove");
      (next || ui.prompt).focus();
    });
    const li = mediaItem(item);
    li.append(remove);
    return li;
  }));
}

// ───────────────────────────── the conversation ─────────────────────────────

// Attachments the browser could not keep (storage full) are left out.
function content(ex) {
  const media = ex.media.filter((m) => m.url);
  if (!media.length) return ex.text;
  const parts = media.map((m) => (m.kind === "image"
    ? { type: "image_url", image_url: { url: m.url } }
    : { type: "video_url", video_url: { url: m.url } }));
  if (ex.text) parts.push({ type: "text", text: ex.text });
  return parts;
}

// Every earlier turn that got an answer (failed turns are left out), then the turn being asked.
function messages(current) {
  const out = [];
  for (const ex of state.exchanges) {
    if (ex === current) break;
    if (ex.status === "error" || !content(ex).length) continue;
    out.push({ role: "user", content: content(ex) }, { role: "assistant", content: ex.answer });
  }
  out.push({ role: "user", content: content(current) });
  return out;
}

function settings() {
  const out = {};
  const temperature = parseFloat(ui.temperature.value);
  const topP = parseFloat(ui.topP.value);
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(temperature)) out.temperature = temperature;
  if (Number.isFinite(topP)) out.top_p = topP;
  if (Number.isFinite(maxTokens)) out.max_tokens = maxTokens;
  return out;
}

function renderExchange(ex) {
  const user = el("div", { class: "msg user" }, el("span", { class: "who", textContent: "You" }));
  if (ex.media.length) user.append(el("ul", { class: "media", "aria-label": "Attachments" },
    ...ex.media.map(mediaItem)));
  user.append(el("p", { class: "text", textContent: ex.text }));
  ex.el = {
    answer: el("p", { class: "text answer" }),
    error: el("p", { class: "error", role: "alert", hidden: true }),
    stats: el("p", { class: "stats" }),
    actions: el("div", { class: "actions" }),
  };
  ex.el.box = el("div", { class: "msg assistant" }, el("span", { class: "who", textContent: "Model" }),
    ex.el.answer, ex.el.error, ex.el.stats, ex.el.actions);
  ex.el.root = el("article", { class: "exchange" }, user, ex.el.box);
  ui.empty.hidden = true;
  ui.log.append(ex.el.root);
  scrollDown(true);
}

function renderAnswer(ex) {
  ex.el.answer.textContent = ex.answer;
  ex.el.box.classList.toggle("streaming", ex.status === "streaming");
  ex.el.box.dataset.status = ex.status;
  ex.el.error.hidden = !ex.error;
  ex.el.error.title = ex.errorDetail || "";
  ex.el.error.replaceChildren();
  if (ex.error) {
    ex.el.error.append(el("span", { class: "message", textContent: ex.error }));
    if (ex.errorDetail) ex.el.error.append(" ", el("small", { class: "detail", textContent: ex.errorDetail }));
  }
  ex.el.stats.textContent = ex.stats || "";
}

// Copy on every answer with text; Regenerate (Retry) and Edit on the last one while nothing streams.
function renderActions() {
  const last = state.exchanges[state.exchanges.length - 1];
  for (const ex of state.exchanges) {
    ex.el.actions.replaceChildren();
    if (ex.answer && ex.status !== "streaming") {
      const copy = el("button", { type: "button", class: "secondary copy", textContent: "Copy",
        "aria-label": "Copy answer" });
      const done = el("span", { class: "copied", role: "status" });
      copy.addEventListener("click", () => copyAnswer(ex, done));
      ex.el.actions.append(copy, done);
    }
    if (ex !== last || state.controller) continue;
    const again = el("button", { type: "button", class: "secondary regenerate",
      textContent: ex.status === "error" ? "Retry" : "Regenerate" });
    again.addEventListener("click", () => ask(ex));
    const edit = el("button", { type: "button", class: "secondary edit", textContent: "Edit" });
    edit.addEventListener("click", () => editLast(ex));
    ex.el.actions.prepend(again, edit);
  }
}

// The Clipboard API needs a secure context (https, or localhost); elsewhere the answer is selected
// and copied the old way.
async function copyAnswer(ex, done) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(ex.answer);
    } else {
      const range = document.createRange();
      range.selectNodeContents(ex.el.answer);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      const copied = document.execCommand("copy");
      getSelection().removeAllRanges();
      if (!copied) throw new Error("refused");
    }
    done.textContent = "Copied";
    setTimeout(() => { done.textContent = ""; }, 2500);
  } catch {
    notice("Could not copy the answer: select it and press Ctrl+C.");
  }
}

// Shows the answer so far, once per frame: a fast model sends hundreds of tokens a second, and
// laying the page out for each would starve the page's input handling (the Stop button).
let painting = null;
function paint(ex) {
  if (!painting) {
    requestAnimationFrame(() => {
      const follow = nearBottom();
      painting.el.answer.textContent = painting.answer;
      painting = null;
      scrollDown(follow);
    });
  }
  painting = ex;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.log.setAttribute("aria-busy", String(busy));
}

// Takes the last turn back into the composer, to be changed and sent again.
function editLast(ex) {
  state.exchanges.pop();
  ex.el.root.remove();
  ui.empty.hidden = state.exchanges.length > 0;
  ui.prompt.value = ex.text;
  state.pending = ex.media.concat(state.pending);
  renderPending();
  renderActions();
  saveConversation();
  ui.prompt.focus();
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  state.exchanges = [];
  state.mediaDropped = false;
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  saveConversation();
  notice("");
  ui.prompt.focus();
}

function send() {
  if (state.controller) return;
  const text = ui.prompt.value.trim();
  if (!text && !state.pending.length) { ui.prompt.focus(); return; }
  if (document.activeElement === ui.send) ui.prompt.focus(); // Send hides while the answer streams
  const ex = { text, media: state.pending, answer: "", status: "", error: null, errorDetail: null, stats: null, el: null };
  state.pending = [];
  ui.prompt.value = "";
  renderPending();
  state.exchanges.push(ex);
  renderExchange(ex);
  ask(ex);
  saveConversation(); // the question is kept even if the page goes away before the answer
}

// ───────────────────────────── keeping the conversation ─────────────────────────────

// One copy per server and model, in localStorage (about 5 MB per site). When the attachments do
// not fit, the texts are kept without them, with a notice.
function storeKey() {
  return state.model ? `${CHAT_STORE}:${location.origin}:${state.model.id}` : null;
}

function saveConversation() {
  const key = storeKey();
  if (!key) return;
  const saved = (withMedia) => JSON.stringify(state.exchanges.map((ex) => ({
    text: ex.text, answer: ex.answer, status: ex.status, error: ex.error, errorDetail: ex.errorDetail,
    stats: ex.stats, media: ex.media.map((m) => ({ kind: m.kind, name: m.name, url: withMedia ? m.url : null })),
  })));
  try {
    if (!state.exchanges.length) { localStorage.removeItem(key); return; }
    try {
      localStorage.setItem(key, saved(true));
    } catch (e) {
      if (!(e instanceof DOMException && (e.name === "QuotaExceededError" || e.code === 22))) throw e;
      localStorage.setItem(key, saved(false));
      if (!state.mediaDropped) notice("The attachments are too large to keep in this browser: after a reload, only the texts will be left.");
      state.mediaDropped = true;
    }
  } catch {
    try { localStorage.removeItem(key); } catch { /* no storage at all */ } // no stale copy left behind
    notice("This browser could not keep the conversation: a reload will lose it.");
  }
}

function restoreConversation() {
  const key = storeKey();
  if (!key || state.exchanges.length) return;
  let saved = [];
  try { saved = JSON.parse(localStorage.getItem(key)) || []; } catch { /* unreadable: start afresh */ }
  if (!Array.isArray(saved)) return;
  const str = (v) => (typeof v === "string" ? v : "");
  for (const s of saved) {
    const media = (Array.isArray(s.media) ? s.media : []).map((m) => ({
      kind: m.kind === "video" ? "video" : "image", name: str(m.name),
      url: str(m.url).startsWith("data:") ? m.url : null,
    }));
    // A turn still streaming when the page went away is shown as stopped.
    const status = ["done", "stopped", "error"].includes(s.status) ? s.status : "stopped";
    const ex = { text: str(s.text), media, answer: str(s.answer), status, error: str(s.error) || null,
      errorDetail: str(s.errorDetail) || null, stats: str(s.stats) || null, el: null };
    state.exchanges.push(ex);
    renderExchange(ex);
    renderAnswer(ex);
  }
  renderActions();
}

// ───────────────────────────── talking to the server ─────────────────────────────

// An error as a sentence a person can act on; `detail` (the HTTP status, the field at fault) is
// shown small beside it.
class ApiError extends Error {
  constructor(message, detail = "") { super(message); this.detail = detail; }
}

// Capitalised (unless it starts with a name from the API, such as max_tokens) and ending in a stop.
function sentence(text) {
  text = String(text || "").trim();
  if (!text) return "";
  if (!/^\S*[_.[\d]/.test(text)) text = text[0].toUpperCase() + text.slice(1);
  return /[.!?…]$/.test(text) ? text : `${text}.`;
}

function asApiError(e) {
  if (e instanceof ApiError) return e;
  if (e instanceof TypeError) { // fetch() throws TypeError when no answer came at all
    return new ApiError("Could not reach the server: check that it is still running, then try again.", e.message);
  }
  return new ApiError(sentence(e.message) || "Something went wrong.");
}

async function apiError(res) {
  let message = "", param = null;
  try {
    const body = await res.text();
    try { ({ message, param } = JSON.parse(body).error); } catch { message = body.slice(0, 300); }
  } catch { /* the body could not be read */ }
  message = String(message || "");
  // "messages[0].content[1].image_url: the image is ..." — the field path goes to the detail.
  const field = param || (message.match(/^(messages\[[^\s:]*): /) || [])[1];
  if (field && message.startsWith(`${field}: `)) message = message.slice(field.length + 2);
  const detail = [`HTTP ${res.status} ${res.statusText}`.trim(), field].filter(Boolean).join(" · ");
  const retry = parseInt(res.headers.get("Retry-After"), 10);
  const limit = message.match(/(?:at most|limit of) (\d+)/);
  let text;
  if (res.status === 401) text = "The server needs an API key: enter it above, then press Retry.";
  else if (res.status === 413) {
    text = "The attachments are too large for this server" +
      (limit ? ` (at most ${Number((limit[1] / 1048576).toFixed(1))} MB a message)` : "") + ": send smaller or fewer of them.";
  } else if (res.status === 429 || res.status === 503) {
    text = `The server is busy; try again in ${retry >= 0 ? `${retry} s` : "a moment"}.`;
  } else text = sentence(message) || `The server answered ${res.status} ${res.statusText}.`.replace(" .", ".");
  return new ApiError(text, detail);
}

function formatStats(usage, t0, tFirst, tLast, stopped) {
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt tokens`, `${usage.completion_tokens} completion tokens`);
  if (tFirst !== null) {
    const n = usage ? usage.completion_tokens : 0;
    // Decoding speed between the first and last token; a short answer can arrive in one network
    // read, so below 50 ms it is the whole request's rate instead.
    const rate = tLast - tFirst >= 50 ? (n - 1) / ((tLast - tFirst) / 1000) : n / ((tLast - t0) / 1000);
    if (n > 0) parts.push(`${rate.toFixed(1)} tokens/s`);
    parts.push(`time to first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  }
  if (stopped) parts.unshift("stopped");
  return parts.join(" · ");
}

// Streams the answer to `ex` (its earlier answer, if any, is replaced: Regenerate and Retry).
async function ask(ex) {
  if (state.controller) return;
  const controller = new AbortController();
  state.controller = controller;
  Object.assign(ex, { answer: "", status: "streaming", error: null, errorDetail: null, stats: null });
  setBusy(true);
  renderAnswer(ex);
  renderActions();
  const body = {
    model: state.model ? state.model.id : "", messages: messages(ex), stream: true,
    stream_options: { include_usage: true }, ...settings(),
  };
  const t0 = performance.now();
  let tFirst = null, tLast = null, usage = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (res.status === 401) askForKey("The API key was refused; enter it again, then press Retry.");
    if (!res.ok) throw await apiError(res);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    read: for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new ApiError("The server closed the connection before the answer was complete; press Retry.");
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        if (data === "[DONE]") break read;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(sentence(chunk.error.message) || "The server reported an error.");
        if (chunk.usage) usage = chunk.usage;
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          tLast = performance.now();
          if (tFirst === null) tFirst = tLast;
          ex.answer += piece;
          paint(ex);
        }
      }
    }
    ex.status = "done";
  } catch (e) {
    if (controller.signal.aborted) {
      ex.status = "stopped";
    } else {
      ex.status = "error";
      const err = asApiError(e);
      ex.error = err.message;
      ex.errorDetail = err.detail || null;
    }
  } finally {
    if (ex.status !== "error") ex.stats = formatStats(usage, t0, tFirst, tLast, ex.status === "stopped");
    state.controller = null;
    if (document.activeElement === ui.stop) ui.prompt.focus(); // Stop hides now
    setBusy(false);
    if (state.exchanges.includes(ex)) {
      renderAnswer(ex);
      renderActions();
      scrollDown(false);
      saveConversation();
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
  ui.prompt.focus();
}

// ───────────────────────────── wiring ─────────────────────────────

ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.controller) { e.preventDefault(); stop(); }
});
ui.stop.addEventListener("click", stop);
ui.clear.addEventListener("click", clearConversation);
ui.files.addEventListener("change", async () => {
  await addFiles([...ui.files.files]);
  ui.files.value = "";
});
document.addEventListener("paste", (e) => {
  const files = e.clipboardData ? [...e.clipboardData.files] : [];
  if (files.length) { e.preventDefault(); addFiles(files); }
});

let dragDepth = 0;
const carriesFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
document.addEventListener("dragenter", (e) => {
  if (!carriesFiles(e)) return;
  dragDepth += 1;
  ui.drop.hidden = false;
});
document.addEventListener("dragover", (e) => { if (carriesFiles(e)) e.preventDefault(); });
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.drop.hidden = true;
});
document.addEventListener("drop", (e) => {
  dragDepth = 0;
  ui.drop.hidden = true;
  if (!carriesFiles(e)) return;
  e.preventDefault();
  addFiles([...e.dataTransfer.files]);
});

loadModel();
