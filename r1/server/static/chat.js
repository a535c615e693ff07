// The chat page: keeps the conversation, streams each answer from /v1/chat/completions (SSE),
// and shows the reasoning (reasoning_content) in a collapsible block above the answer.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content}; assistant turns keep only the answer, as the template wants
let controller = null;  // aborts the request in flight

const settings = {
  load() {
    const saved = JSON.parse(localStorage.getItem("r1-settings") || "{}");
    for (const id of ["temperature", "reasoning-cap", "max-tokens", "api-key"]) {
      if (saved[id] !== undefined) $(id).value = saved[id];
    }
    $("temperature-value").textContent = $("temperature").value;
  },
  save() {
    const values = {};
    for (const id of ["temperature", "reasoning-cap", "max-tokens", "api-key"]) values[id] = $(id).value;
    localStorage.setItem("r1-settings", JSON.stringify(values));
    $("temperature-value").textContent = $("temperature").value;
  },
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = "Bearer " + $("api-key").value;
  return h;
}

function addTurn(role, text) {
  const turn = document.createElement("article");
  turn.className = "turn " + role;
  turn.textContent = text;
  $("conversation").append(turn);
  return turn;
}

function scrollDown() {
  const c = $("conversation");
  c.scrollTop = c.scrollHeight;
}

// Yields the JSON payloads of a server-sent event stream, one `data:` line at a time.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = $("assistant-turn").content.firstElementChild.cloneNode(true);
  $("conversation").append(turn);
  const reasoningBlock = turn.querySelector(".reasoning");
  const reasoningText = turn.querySelector(".reasoning-text");
  const answer = turn.querySelector(".answer");

  const body = {
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  if ($("reasoning-cap").value !== "") body.max_reasoning_tokens = Number($("reasoning-cap").value);

  controller = new AbortController();
  $("send").hidden = true;
  $("stop").hidden = false;
  const started = performance.now();
  let finish = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) {
          reasoningBlock.hidden = false;
          reasoningText.textContent += delta.reasoning_content;
        }
        if (delta.content) {
          if (!answer.textContent && reasoningText.textContent) reasoningBlock.open = false;
          answer.textContent += delta.content;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      scrollDown();
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      const error = document.createElement("div");
      error.className = "error";
      error.textContent = "Error: " + e.message;
      turn.append(error);
    }
    finish = finish || "stopped";
  } finally {
    controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
  history.push({ role: "assistant", content: answer.textContent });
  const seconds = (performance.now() - started) / 1000;
  const rate = usage ? (usage.completion_tokens / seconds).toFixed(1) : "";
  $("status").textContent = usage
    ? `${usage.completion_tokens} tokens in ${seconds.toFixed(1)} s (${rate} tok/s), finish: ${finish}`
    : `finish: ${finish}`;
  scrollDown();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("conversation").replaceChildren();
  $("status").textContent = "";
});
$("settings").addEventListener("input", () => settings.save());
$("api-key").addEventListener("change", () => showModelName());

// The served model's name in the header; asked again when the key changes (a keyed server says 401).
function showModelName() {
  fetch("/v1/models", { headers: headers() })
    .then((r) => r.json())
    .then((r) => { $("model-name").textContent = r.data ? r.data[0].id : ""; })
    .catch(() => {});
}

settings.load();
showModelName();
