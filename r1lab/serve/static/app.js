// r1lab web chat: streams /v1/chat/completions (SSE over fetch) and shows reasoning_content in a
// collapsible "Thinking" panel above the answer. Model text only ever reaches the page through
// textContent / Text nodes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), conversation: $("conversation"), empty: $("empty"), scroller: $("scroller"),
  form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
};

const SETTINGS_KEY = "r1lab.chat.settings";
const state = { history: [], model: null, controller: null };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- settings
function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    if (saved.temperature !== undefined) els.temperature.value = saved.temperature;
    if (saved.maxTokens !== undefined) els.maxTokens.value = saved.maxTokens;
    if (saved.apiKey) els.apiKey.value = saved.apiKey;
  } catch (e) { /* a corrupt entry: keep the defaults */ }
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({
    temperature: els.temperature.value, maxTokens: els.maxTokens.value, apiKey: els.apiKey.value,
  }));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) {
      els.model.textContent = "API key needed (Settings)";
      return;
    }
    const data = await res.json();
    state.model = data.data[0].id;
    els.model.textContent = state.model;
    const cap = data.data[0].max_tokens_cap;
    if (cap) {
      els.maxTokens.max = cap;
      if (Number(els.maxTokens.value) > cap) els.maxTokens.value = cap;
    }
  } catch (e) {
    els.model.textContent = "server unreachable";
  }
}

// ---------------------------------------------------------------- conversation view
function scrollToEnd(force) {
  const s = els.scroller;
  if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 120) s.scrollTop = s.scrollHeight;
}

function addUserMessage(text) {
  els.empty.hidden = true;
  const row = el("div", "msg user");
  row.appendChild(el("div", "bubble", text));
  els.conversation.appendChild(row);
  scrollToEnd(true);
}

function addAssistantMessage() {
  const row = el("div", "msg assistant");
  row.appendChild(el("div", "avatar", "r1"));
  const body = el("div", "body");
  const thinking = el("details", "thinking live");
  thinking.open = true;
  thinking.hidden = true;
  const summary = el("summary", null, "Thinking…");
  const reasoning = el("div", "thinking-body");
  const reasoningText = document.createTextNode("");
  reasoning.appendChild(reasoningText);
  thinking.append(summary, reasoning);
  const answer = el("div", "answer pending");
  const answerText = document.createTextNode("");
  answer.appendChild(answerText);
  body.append(thinking, answer);
  row.appendChild(body);
  els.conversation.appendChild(row);
  scrollToEnd(true);
  return { row, body, thinking, summary, reasoningText, answer, answerText };
}

function note(view, text, className) {
  view.body.appendChild(el("div", className || "note", text));
}

// ---------------------------------------------------------------- streaming
function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}

async function send(text) {
  if (state.controller) return;
  if (!state.model) await loadModel();
  addUserMessage(text);
  const history = state.history;  // "New chat" replaces the array; this reply belongs to the old one
  history.push({ role: "user", content: text });
  const view = addAssistantMessage();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  const started = performance.now();
  let thoughtFor = null;      // seconds, fixed when the answer starts (or the stream ends)
  let answer = "";
  let finish = null;
  const tick = setInterval(() => {
    if (thoughtFor === null) view.summary.textContent = `Thinking… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  const endThinking = () => {
    if (thoughtFor !== null) return;
    thoughtFor = (performance.now() - started) / 1000;
    view.summary.textContent = `Thought for ${thoughtFor.toFixed(1)} s`;
    view.thinking.classList.remove("live");
  };

  const body = {
    model: state.model || "", stream: true, messages: history,
    temperature: Number(els.temperature.value), max_tokens: Number(els.maxTokens.value),
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          const choice = msg.choices && msg.choices[0];
          if (!choice) continue;
          const delta = choice.delta || {};
          if (delta.reasoning_content) {
            view.thinking.hidden = false;
            view.reasoningText.appendData(delta.reasoning_content);
          }
          if (delta.content) {
            endThinking();
            answer += delta.content;
            view.answerText.appendData(delta.content);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        scrollToEnd(false);
      }
    }
    if (finish === "length") note(view, "Stopped at the token limit (raise Max tokens in Settings).");
  } catch (err) {
    if (err.name === "AbortError") note(view, "Stopped.");
    else note(view, String(err.message || err), "error");
  } finally {
    clearInterval(tick);
    endThinking();
    view.answer.classList.remove("pending");
    if (!answer) view.answer.hidden = true;
    // The reasoning is not sent back: the server would strip it anyway (as DeepSeek does).
    history.push({ role: "assistant", content: answer });
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    scrollToEnd(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.history = [];
  for (const node of [...els.conversation.children]) if (node !== els.empty) node.remove();
  els.empty.hidden = false;
  setBusy(false);
  els.input.focus();
}

// ---------------------------------------------------------------- wiring
function autoGrow() {
  els.input.style.height = "auto";
  els.input.style.height = Math.min(els.input.scrollHeight, 200) + "px";
}

els.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = els.input.value.trim();
  if (!text || state.controller) return;
  els.input.value = "";
  autoGrow();
  send(text);
});
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.form.requestSubmit();
  }
});
els.input.addEventListener("input", autoGrow);
els.stop.addEventListener("click", () => state.controller && state.controller.abort());
els.newChat.addEventListener("click", newChat);
els.settingsToggle.addEventListener("click", () => {
  els.settings.hidden = !els.settings.hidden;
  els.settingsToggle.setAttribute("aria-expanded", String(!els.settings.hidden));
});
for (const input of [els.temperature, els.maxTokens, els.apiKey]) input.addEventListener("change", saveSettings);
els.apiKey.addEventListener("change", loadModel);

loadSettings();
loadModel();
els.input.focus();
