// The chat page's script: the agent's HTTP/SSE contract, on this page's own origin, in plain JS.
//
// A turn is a POST that answers with an SSE stream. EventSource can neither POST nor send an
// Authorization header, so streams are read with fetch() and parsed here. Model output only
// ever reaches the DOM as text nodes (and as <a> elements built here for http/https URLs).
"use strict";

const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const STORED = { token: "agent.token", session: "agent.session", sessions: "agent.sessions" };
const MAX_REMEMBERED_SESSIONS = 50;
const REATTACH_DELAYS_MS = [200, 500, 1000, 2000, 4000, 8000];

const $ = (id) => document.getElementById(id);
const ui = {
  token: $("token"), session: $("session"), knownSessions: $("known-sessions"), newSession: $("new-session"),
  settings: $("settings"), log: $("log"), status: $("status"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), interrupt: $("interrupt"),
};

let running = null;  // the TurnView being streamed, if any
let shownSession = null;  // the session whose conversation the log shows

// -- storage ------------------------------------------------------------------------------

function rememberedSessions() {
  try {
    const ids = JSON.parse(localStorage.getItem(STORED.sessions) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string" && SESSION_ID.test(id)) : [];
  } catch {
    return [];
  }
}

function rememberSession(id) {
  const ids = [id, ...rememberedSessions().filter((known) => known !== id)].slice(0, MAX_REMEMBERED_SESSIONS);
  localStorage.setItem(STORED.sessions, JSON.stringify(ids));
  sessionStorage.setItem(STORED.session, id);
  offerSessions(ids);
}

function offerSessions(ids) {
  ui.knownSessions.replaceChildren(...ids.map((id) => new Option(id, id)));
}

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "chat-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- HTTP ---------------------------------------------------------------------------------

function api(method, path, { body, lastEventId, signal } = {}) {
  const headers = { accept: "text/event-stream, application/json" };
  const token = ui.token.value.trim();
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  if (lastEventId) headers["last-event-id"] = lastEventId;
  return fetch(path, { method, headers, signal, cache: "no-store", credentials: "omit",
                       body: body === undefined ? undefined : JSON.stringify(body) });
}

const sessionPath = (id, tail) => `/sessions/${encodeURIComponent(id)}/${tail}`;

// A refused request in words: what happened and what to do about it.
async function refusal(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    detail = response.statusText;
  }
  const wait = response.headers.get("retry-after");
  const retry = wait ? ` Try again in ${wait} s.` : " Try again shortly.";
  switch (response.status) {
    case 401: return "The server refused the token (401 Unauthorized). Enter the right token above and send again.";
    case 403: return "Refused in front of the agent (403 Forbidden): ask whoever runs it for access.";
    case 404: return `Not found (404): ${detail}.`;
    case 409: return "A turn is already running on this session (409 Conflict). Wait for it to end, or interrupt it.";
    case 410: return `The earlier events of this turn are no longer kept (410): ${detail}.`;
    case 413: return "The message is too long for the server (413 Payload Too Large).";
    case 429: return `Too many turns at once for this account (429 Too Many Requests).${retry}`;
    case 503: return `The service is not ready (503 Service Unavailable): ${detail}.${retry}`;
    case 507: return `The server's disk is full (507): ${detail}.${retry}`;
    default: return `The request was refused (${response.status}): ${detail}`;
  }
}

// Server-sent events from a fetch() body. Hand-written because EventSource cannot POST or set
// headers; our servers end lines with \r\n or \n (a lone \r, legal in SSE, is not handled).
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, type: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (event.data.length) yield { id: event.id, type: event.type, data: event.data.join("\n") };
        event = { id: null, type: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;  // heartbeat comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const content = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") event.data.push(content);
      else if (field === "event") event.type = content;
      else if (field === "id") event.id = content;
    }
  }
}

// -- rendering ----------------------------------------------------------------------------

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

// Only http(s) URLs become links; anything else (javascript:, data:, ...) stays text.
function safeUrl(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

const LINK = /\[([^\]\n]+)\]\(([^()\s]+)\)|(https?:\/\/[^\s<>"'()[\]]*[^\s<>"'()[\].,;:!?])/g;

function renderText(container, text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(LINK)) {
    const [whole, label, target, bare] = match;
    const href = safeUrl(target ?? bare);
    if (!href) continue;
    nodes.push(document.createTextNode(text.slice(last, match.index)));
    const link = element("a", "", label ?? bare);
    link.href = href;
    link.rel = "noopener noreferrer";
    link.target = "_blank";
    nodes.push(link);
    last = match.index + whole.length;
  }
  nodes.push(document.createTextNode(text.slice(last)));
  container.replaceChildren(...nodes);
}

const ERROR_WORDS = {
  sandbox_lost: "The session's sandbox stopped during this turn. The conversation so far is kept: send the message again.",
  interrupted: "Interrupted.",
  rate_limited: "The model is rate-limited right now. Try again shortly.",
  overloaded: "The model is overloaded right now. Try again shortly.",
  model_unavailable: "The model could not be reached. Try again shortly.",
  model_auth_failed: "The server's model credentials were refused. Ask whoever runs this server.",
};

function formatResult(result) {
  const parts = [];
  if (typeof result.duration_ms === "number") parts.push(`${(result.duration_ms / 1000).toFixed(1)} s`);
  if (typeof result.total_cost_usd === "number") parts.push(`cost $${result.total_cost_usd.toFixed(4)}`);
  if (typeof result.num_turns === "number") parts.push(`${result.num_turns} model call${result.num_turns === 1 ? "" : "s"}`);
  return (result.is_error ? "Ended with an error" : "Done") + (parts.length ? ` · ${parts.join(" · ")}` : "");
}

// One turn on screen: the prompt, then the answer as its events arrive (each event id once).
class TurnView {
  constructor(prompt) {
    this.root = element("article", "turn");
    if (prompt) this.root.append(element("p", "you", prompt));
    this.answer = element("div", "agent");
    this.root.append(this.answer);
    ui.log.append(this.root);
    this.seen = new Set();
    this.lastEventId = null;
    this.done = false;
    this.text = null;      // { el, value } of the text run being streamed
    this.thinking = null;  // { el, value } likewise for thinking
    this.tools = new Map();
  }

  apply(event) {
    if (event.id !== null) {
      if (this.seen.has(event.id)) return;
      this.seen.add(event.id);
      this.lastEventId = event.id;
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    const handler = this[`on_${event.type}`];
    if (handler) handler.call(this, data);
    this.root.scrollIntoView({ block: "end" });
  }

  on_text(data) {
    this.thinking = null;
    if (!this.text) {
      this.text = { el: element("div", "text"), value: "" };
      this.answer.append(this.text.el);
    }
    this.text.value += data.text;
    renderText(this.text.el, this.text.value);
  }

  on_thinking(data) {
    this.text = null;
    if (!this.thinking) {
      const details = element("details", "thinking");
      details.append(element("summary", "", "Thinking"));
      this.thinking = { el: element("div", "thinking-text"), value: "" };
      details.append(this.thinking.el);
      this.answer.append(details);
    }
    this.thinking.value += data.text;
    this.thinking.el.textContent = this.thinking.value;
  }

  on_tool_use(data) {
    this.text = this.thinking = null;
    const details = element("details", "tool");
    const summary = element("summary", "", `Tool call: ${data.name}`);
    const state = element("span", "tool-state", " (running)");
    summary.append(state);
    details.append(summary, element("pre", "tool-input", JSON.stringify(data.input, null, 2)));
    this.answer.append(details);
    this.tools.set(data.id, { details, state });
  }

  on_tool_result(data) {
    const tool = this.tools.get(data.tool_use_id);
    const output = element("div", data.is_error ? "tool-result failed" : "tool-result");
    output.append(element("strong", "", data.is_error ? "Failed:" : "Result:"), element("pre", "", data.content));
    if (tool) {
      tool.state.textContent = data.is_error ? " (failed)" : " (done)";
      tool.details.append(output);
    } else {
      this.answer.append(output);
    }
  }

  on_result(data) {
    this.text = this.thinking = null;
    this.answer.append(element("p", "result", formatResult(data)));
  }

  on_error(data) {
    this.text = this.thinking = null;
    this.problem(ERROR_WORDS[data.code] || data.message || "The turn failed.");
  }

  on_done() {
    this.done = true;
  }

  problem(words) {
    this.answer.append(element("p", "error", words));
  }

  note(words) {
    const el = element("p", "note", words);
    this.answer.append(el);
    return el;
  }
}

// -- turns --------------------------------------------------------------------------------

// While a turn runs Send is off; Interrupt is on only once the server has started the turn.
function setRunning(view, started = false) {
  running = view;
  ui.send.disabled = view !== null;
  ui.interrupt.disabled = !started;
  ui.log.setAttribute("aria-busy", view === null ? "false" : "true");
}

// Read one response's events into the view. Returns normally when the stream ends (with or
// without `done`); throws when the connection breaks mid-stream.
async function consume(view, response) {
  for await (const event of sseEvents(response)) view.apply(event);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// After a dropped connection: GET .../events from the last event seen, until `done` arrives.
async function reattach(sessionId, view) {
  const notice = view.note("Connection lost; reconnecting…");
  for (const delay of REATTACH_DELAYS_MS) {
    await sleep(delay);
    let response;
    try {
      response = await api("GET", sessionPath(sessionId, "events"), { lastEventId: view.lastEventId });
    } catch {
      continue;  // the server is unreachable: try again
    }
    if (!response.ok) {
      notice.remove();
      view.problem(response.status === 404
        ? "The connection dropped and this turn can no longer be found. Send the message again."
        : await refusal(response));
      return;
    }
    try {
      await consume(view, response);
    } catch {
      // dropped again: next attempt
    }
    if (view.done) {
      notice.remove();
      return;
    }
  }
  notice.remove();
  view.problem("The connection dropped and could not be restored. The turn may still finish: "
    + "pick this session again later to see it.");
}

// Stream a turn into `view` (from the POST, or from a re-attach), re-attaching on drops.
async function follow(sessionId, view, response) {
  setRunning(view, true);
  try {
    try {
      await consume(view, response);
    } catch {
      // the connection broke: re-attach below
    }
    if (!view.done) await reattach(sessionId, view);
  } finally {
    setRunning(null);
  }
}

async function sendPrompt(prompt) {
  const typed = ui.session.value.trim();
  if (typed !== shownSession && !switchSession(typed)) return;
  const sessionId = shownSession;
  rememberSession(sessionId);
  const view = new TurnView(prompt);
  setRunning(view);
  let response;
  try {
    response = await api("POST", sessionPath(sessionId, "messages"), { body: { prompt } });
  } catch {
    view.problem("Could not reach the server. Check that it is running, then send again.");
    setRunning(null);
    return;
  }
  if (!response.ok) {
    view.problem(await refusal(response));
    setRunning(null);
    return;
  }
  ui.prompt.value = "";
  await follow(sessionId, view, response);
}

// Show a session's latest turn (the running one, followed live, or the last finished one).
async function showLatestTurn(sessionId) {
  let response;
  try {
    response = await api("GET", sessionPath(sessionId, "events"));
  } catch {
    showStatus("Could not reach the server.");
    return;
  }
  if (response.status === 404) {
    showStatus(`Session ${sessionId}: no turn to show yet.`);
    return;
  }
  if (!response.ok) {
    showStatus(await refusal(response));
    return;
  }
  const view = new TurnView(null);
  view.note(`Latest turn of session ${sessionId}:`);
  await follow(sessionId, view, response);
}

async function interrupt() {
  const sessionId = shownSession;
  let response;
  try {
    response = await api("POST", sessionPath(sessionId, "interrupt"));
  } catch {
    showStatus("Could not reach the server to interrupt.");
    return;
  }
  if (response.status === 409) showStatus("No turn is running on this session any more.");
  else if (!response.ok) showStatus(await refusal(response));
  else showStatus("Interrupt sent.");
}

function showStatus(words) {
  ui.status.textContent = words;
}

// Show another session (nothing happens for the one shown or an invalid id). Returns its id if switched.
function switchSession(sessionId) {
  if (!SESSION_ID.test(sessionId)) {
    showStatus("The session id must be 1-64 letters, digits, '_' or '-', starting with a letter or digit.");
    return;
  }
  if (sessionId === shownSession) return;
  if (running) {
    ui.session.value = shownSession;
    showStatus("A turn is running: wait for it to end, or interrupt it, before switching sessions.");
    return;
  }
  shownSession = sessionId;
  ui.session.value = sessionId;
  rememberSession(sessionId);
  ui.log.replaceChildren();
  showStatus(`Session ${sessionId}.`);
  return sessionId;
}

// -- wiring -------------------------------------------------------------------------------

ui.token.value = sessionStorage.getItem(STORED.token) || "";
ui.token.addEventListener("input", () => sessionStorage.setItem(STORED.token, ui.token.value.trim()));

ui.settings.addEventListener("submit", (event) => {
  event.preventDefault();
  const sessionId = switchSession(ui.session.value.trim());
  if (sessionId) showLatestTurn(sessionId);
});
ui.session.addEventListener("change", () => ui.settings.requestSubmit());
ui.newSession.addEventListener("click", () => {
  if (switchSession(newSessionId())) showStatus(`New session ${ui.session.value}.`);
  ui.prompt.focus();
});

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = ui.prompt.value;
  if (running || !prompt.trim()) return;
  showStatus("");
  sendPrompt(prompt);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.interrupt.addEventListener("click", interrupt);

(function start() {
  offerSessions(rememberedSessions());
  const current = sessionStorage.getItem(STORED.session);
  if (current && SESSION_ID.test(current)) {
    switchSession(current);
    showLatestTurn(current);
  } else {
    switchSession(newSessionId());
  }
})();
