// The chat page: conversations kept in this browser (localStorage), replies streamed from /v1/chat/completions
// and rendered as Markdown, and feedback (thumbs on a reply; "regenerate" shows two replies and asks which is
// better) sent to /feedback, which writes it where yunque's alignment stage reads it.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "yunque.chat";
const state = loadState();
let controller = null; // the AbortController of the reply being streamed

function loadState() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE));
    if (s && Array.isArray(s.conversations)) return s;
  } catch (e) { /* a damaged store starts afresh */ }
  return { conversations: [], current: null, settings: {} };
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state));
}

function current() {
  let c = state.conversations.find((x) => x.id === state.current);
  if (!c) {
    c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [], pair: null };
    state.conversations.unshift(c);
    state.current = c.id;
  }
  return c;
}

// -- settings ----------------------------------------------------------------------------------------------------

const FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed", "key"];

function readSettings() {
  for (const f of FIELDS) state.settings[f] = $(f).value;
  state.settings.model = $("model").value;
  save();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h.Authorization = `Bearer ${$("key").value}`;
  return h;
}

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    select.innerHTML = "";
    for (const m of body.data) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      select.appendChild(o);
    }
    if (state.settings.model && body.data.some((m) => m.id === state.settings.model)) select.value = state.settings.model;
    status("");
  } catch (e) {
    status(`Could not list models: ${e.message}`);
  }
}

function status(text) {
  $("status").textContent = text;
}

// -- talking to the server ---------------------------------------------------------------------------------------

function withSystem(messages) {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

// Stream one reply to `messages`; onText(textSoFar) after each piece. Resolves to the whole reply.
async function streamReply(messages, onText) {
  controller = new AbortController();
  setBusy(true);
  const body = {
    model: $("model").value, messages: withSystem(messages), stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  let text = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `${r.status} ${r.statusText}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              text += choice.delta.content;
              onText(text);
            }
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") status("Stopped.");
    else { status(`Error: ${e.message}`); throw e; }
  } finally {
    controller = null;
    setBusy(false);
  }
  return text;
}

async function sendFeedback(record) {
  const r = await fetch("/feedback", { method: "POST", headers: headers(), body: JSON.stringify(record) });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// -- rendering ---------------------------------------------------------------------------------------------------

function bubble(role, content, index) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (index !== undefined) div.dataset.index = index;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") body.innerHTML = Markdown.render(content);
  else body.textContent = content;
  div.appendChild(body);
  return div;
}

function button(cls, label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function render() {
  const c = current();
  const box = $("messages");
  box.innerHTML = "";
  const last = c.messages.length - 1;
  c.messages.forEach((m, i) => {
    if (c.pair && c.pair.index === i) return box.append(...pairView(c));
    const div = bubble(m.role, m.content, i);
    if (m.role === "assistant") {
      div.dataset.done = "1";
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(
        button("thumb-up" + (m.rating === 1 ? " chosen" : ""), "▲ Good", "A good reply", () => rate(c, i, 1)),
        button("thumb-down" + (m.rating === -1 ? " chosen" : ""), "▼ Bad", "A bad reply", () => rate(c, i, -1)));
      if (i === last) actions.append(button("regenerate", "↻ Regenerate", "Another reply, and say which is better",
        () => regenerate(c, i)));
      div.appendChild(actions);
    }
    box.appendChild(div);
  });
  box.scrollTop = box.scrollHeight;
  renderHistory();
}

function pairView(c) {
  const { index, a, b } = c.pair;
  const question = document.createElement("p");
  question.className = "pair-question";
  question.textContent = b === null ? "Generating a second reply…" : "Which reply is better?";
  const row = document.createElement("div");
  row.className = "pair";
  const left = bubble("assistant", a, index);
  const right = bubble("assistant", b || "", index);
  right.classList.add("second");
  if (b !== null) {
    left.dataset.done = right.dataset.done = "1";
    for (const [div, cls, label, chosen, rejected] of [[left, "prefer-a", "A is better", a, b],
                                                       [right, "prefer-b", "B is better", b, a]]) {
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.appendChild(button(cls, label, "Keep this reply and record the preference",
        () => prefer(c, index, chosen, rejected)));
      div.appendChild(actions);
    }
  }
  row.append(left, right);
  return [question, row];
}

function renderHistory() {
  const ul = $("history");
  ul.innerHTML = "";
  for (const c of state.conversations) {
    const li = document.createElement("li");
    li.textContent = c.title;
    if (c.id === state.current) li.className = "current";
    li.addEventListener("click", () => { state.current = c.id; save(); render(); });
    const del = button("delete", "×", "Delete this conversation", (e) => {
      e.stopPropagation();
      state.conversations = state.conversations.filter((x) => x !== c);
      if (state.current === c.id) state.current = null;
      save();
      render();
    });
    li.appendChild(del);
    ul.appendChild(li);
  }
}

// -- actions -----------------------------------------------------------------------------------------------------

async function send(text) {
  const c = current();
  if (c.pair) { c.pair = null; } // a new message keeps reply A
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  c.model = $("model").value;
  save();
  render();
  const div = bubble("assistant", "");
  $("messages").appendChild(div);
  const body = div.querySelector(".body");
  let reply = "";
  try {
    reply = await streamReply(c.messages, (t) => {
      body.innerHTML = Markdown.render(t);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  } catch (e) {
    reply = null;
  }
  if (reply === null) { c.messages.pop(); save(); render(); return; } // the message can be sent again
  c.messages.push({ role: "assistant", content: reply, model: $("model").value });
  save();
  render();
}

function conversationBefore(c, index) {
  return withSystem(c.messages.slice(0, index).map(({ role, content }) => ({ role, content })));
}

async function rate(c, index, rating) {
  const m = c.messages[index];
  try {
    await sendFeedback({ kind: "rating", model: m.model || $("model").value, messages: conversationBefore(c, index),
                         reply: m.content, rating });
    m.rating = rating;
    save();
    render();
    status(rating === 1 ? "Saved: a good reply." : "Saved: a bad reply.");
  } catch (e) {
    status(`Feedback not saved: ${e.message}`);
  }
}

async function regenerate(c, index) {
  c.pair = { index, a: c.messages[index].content, b: null };
  render();
  const right = $("messages").querySelector(".pair .second .body");
  let b;
  try {
    b = await streamReply(c.messages.slice(0, index), (t) => { right.innerHTML = Markdown.render(t); });
  } catch (e) {
    b = null;
  }
  if (b === null || b === c.pair.a) {
    c.pair = null;
    if (b !== null) status("The second reply is the same as the first; nothing to compare.");
  } else {
    c.pair.b = b;
  }
  save();
  render();
}

async function prefer(c, index, chosen, rejected) {
  try {
    await sendFeedback({ kind: "preference", model: c.messages[index].model || $("model").value,
                         messages: conversationBefore(c, index), chosen, rejected });
    c.messages[index] = { ...c.messages[index], content: chosen, rating: undefined };
    c.pair = null;
    save();
    render();
    status("Saved: your preference.");
  } catch (e) {
    status(`Preference not saved: ${e.message}`);
  }
}

// -- wiring ------------------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => { state.current = null; current(); save(); render(); });
for (const f of FIELDS) {
  if (state.settings[f] !== undefined) $(f).value = state.settings[f];
  $(f).addEventListener("change", readSettings);
}
$("model").addEventListener("change", readSettings);
$("key").addEventListener("change", loadModels);
loadModels();
render();
