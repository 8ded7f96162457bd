// The chat page: conversations (store.js), the API (api.js), replies rendered as Markdown (markdown.js).
//
// Model output is shown through renderMarkdown() (which escapes all of it) or textContent, nothing
// else. One reply streams per tab at a time; other tabs and other users are separate requests, which
// the server's engine batches together.

import { listModels, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"),
  list: $("conversation-list"),
  newChat: $("new-chat"),
  title: $("chat-title"),
  model: $("model-name"),
  notice: $("notice"),
  systemPanel: $("system-panel"),
  system: $("system-prompt"),
  systemPreview: $("system-preview"),
  messages: $("messages"),
  error: $("error"),
  errorText: $("error-text"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  settings: $("settings"),
  temperature: $("temperature"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  main: $("main"),
  status: $("status"),
};

const state = {
  model: null, // the served model id, from /v1/models
  conversation: null,
  settings: store.loadSettings(),
  apiKey: store.loadApiKey(),
  stream: null, // {controller, conversation, message} while a reply streams
  editing: null, // index of the user message being edited
  renaming: null, // id of the conversation being renamed
  offline: false, // the last /v1/models call failed
};

// ------------------------------------------------------------------------------------------------
// Small helpers

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function showError(message) {
  ui.errorText.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.errorText.textContent = "";
}

/** Run `action` now if `button` was clicked twice within 3 s (a second click confirms). */
function confirmTwice(button, label, action) {
  if (button.dataset.armed) {
    action();
    return;
  }
  const original = button.textContent;
  const name = button.getAttribute("aria-label");
  button.dataset.armed = "1";
  button.textContent = label;
  if (name !== null) button.setAttribute("aria-label", `${name}: press again to confirm`);
  button.classList.add("armed");
  setTimeout(() => {
    delete button.dataset.armed;
    button.textContent = original;
    if (name !== null) button.setAttribute("aria-label", name);
    button.classList.remove("armed");
  }, 3000);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // no clipboard API (a plain-http page on another host): the old way
    const area = el("textarea", { value: text, className: "offscreen" });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const original = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = original), 1200);
}

function save(conversation = state.conversation) {
  try {
    store.saveConversation(conversation);
  } catch (err) {
    showError(err.message);
  }
}

// ------------------------------------------------------------------------------------------------
// Conversation list

function renderList() {
  const saved = store.listConversations();
  const current = state.conversation;
  const items = saved.some((c) => c.id === current.id) ? saved : [current, ...saved];
  ui.list.replaceChildren(
    ...items.map((conversation) => {
      const id = conversation.id;
      const shown = id === current.id ? current : conversation; // the open one is fresher in memory
      const li = el("li", { className: `conversation${id === current.id ? " current" : ""}`, dataset: { id } });
      if (state.renaming === id) {
        const input = el("input", { className: "rename-input", value: store.titleOf(shown), "aria-label": "Conversation name" });
        input.addEventListener("keydown", (event) => {
          if (event.key === "Enter") finishRename(id, input.value);
          if (event.key === "Escape") finishRename(id, null);
        });
        input.addEventListener("blur", () => finishRename(id, input.value));
        li.append(input);
        queueMicrotask(() => input.select());
      } else {
        const open = el("button", { type: "button", className: "open", textContent: store.titleOf(shown) });
        if (id === current.id) open.setAttribute("aria-current", "true");
        open.addEventListener("click", () => openConversation(id));
        const title = store.titleOf(shown);
        const rename = el("button", { type: "button", className: "icon-button rename", textContent: "✎", "aria-label": `Rename “${title}”` });
        rename.addEventListener("click", () => {
          state.renaming = id;
          renderList();
        });
        const remove = el("button", { type: "button", className: "icon-button delete", textContent: "🗑", "aria-label": `Delete “${title}”` });
        remove.addEventListener("click", () => confirmTwice(remove, "Delete?", () => deleteConversation(id)));
        li.append(open, rename, remove);
      }
      return li;
    }),
  );
  ui.title.textContent = store.titleOf(current);
  document.title = `${store.titleOf(current)} · qwenlm chat`;
}

function finishRename(id, title) {
  if (state.renaming !== id) return;
  state.renaming = null;
  if (title !== null) {
    const conversation = id === state.conversation.id ? state.conversation : store.loadConversation(id);
    if (conversation) {
      conversation.title = title.trim();
      save(conversation);
    }
  }
  renderList();
}

function deleteConversation(id) {
  store.deleteConversation(id);
  if (id === state.conversation.id) {
    stopStreaming();
    const next = store.listConversations()[0];
    showConversation(next || store.newConversation());
  } else {
    renderList();
  }
}

function openConversation(id) {
  if (state.conversation && id === state.conversation.id) {
    setSidebar(false); // tapping the open conversation still closes the sidebar on a phone
    return;
  }
  const conversation = store.loadConversation(id);
  if (conversation) showConversation(conversation);
}

function showConversation(conversation) {
  stopStreaming();
  state.conversation = conversation;
  state.editing = null;
  history.replaceState(null, "", `#${conversation.id}`);
  ui.system.value = conversation.system;
  updateSystemPreview();
  hideError();
  renderList();
  renderMessages();
  setSidebar(false);
  ui.prompt.focus();
}

/** Narrow screens: the sidebar slides over the page; closed, its controls leave the Tab order (inert). */
function setSidebar(open) {
  ui.sidebar.classList.toggle("open", open);
  $("sidebar-toggle").setAttribute("aria-expanded", String(open));
  ui.sidebar.inert = !open && window.matchMedia("(max-width: 760px)").matches;
}

// ------------------------------------------------------------------------------------------------
// Messages

const FINISH_NOTES = { length: "max tokens reached", stopped: "stopped", error: "interrupted" };

function metaText(message) {
  const meta = message.meta || {};
  const parts = [];
  if (meta.tokens) {
    parts.push(`${meta.tokens} tokens`);
    if (meta.seconds) parts.push(`${meta.seconds.toFixed(1)} s`, `${(meta.tokens / meta.seconds).toFixed(1)} tokens/s`);
  }
  if (FINISH_NOTES[meta.finish]) parts.push(FINISH_NOTES[meta.finish]);
  else if (meta.streaming && state.stream?.message !== message) parts.push(FINISH_NOTES.error); // page left mid-reply
  return parts.join(" · ");
}

function fillContent(node, message, streaming) {
  if (message.role === "user") {
    node.textContent = message.content; // the user's own text, shown as typed
  } else if (message.content) {
    node.innerHTML = renderMarkdown(message.content); // escapes all model text (markdown.js)
  } else {
    node.textContent = streaming ? "" : "(empty reply)";
  }
}

function actionButton(action, label, text = label) {
  return el("button", { type: "button", className: "action", textContent: text, "aria-label": label, dataset: { action } });
}

function messageElement(message, index, isLast) {
  const streaming = state.stream?.message === message;
  const article = el("article", {
    className: `message ${message.role}${streaming ? " streaming" : ""}`,
    dataset: { role: message.role, index: String(index) },
    "aria-label": message.role === "user" ? "You" : "Assistant",
  });
  const bubble = el("div", { className: "bubble" });
  if (state.editing === index) {
    const box = el("textarea", { className: "edit-box", value: message.content, rows: 3, "aria-label": "Edit message" });
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        resendEdited(index, box.value);
      } else if (event.key === "Escape") {
        cancelEdit();
      }
    });
    const actions = el("div", { className: "actions visible" }, [
      actionButton("save-edit", "Send edited message", "Send"),
      actionButton("cancel-edit", "Cancel edit", "Cancel"),
    ]);
    bubble.append(box, actions);
    queueMicrotask(() => box.focus());
  } else {
    const content = el("div", { className: "content" });
    fillContent(content, message, streaming);
    const meta = el("div", { className: "meta", textContent: metaText(message) });
    const actions = el("div", { className: "actions" });
    if (!state.stream) {
      if (message.role === "user") {
        actions.append(actionButton("edit", "Edit"));
        if (isLast) actions.append(actionButton("regenerate", "Retry"));
      } else if (isLast) {
        actions.append(actionButton("regenerate", "Regenerate"));
      }
    }
    actions.append(actionButton("copy", "Copy message", "Copy"));
    bubble.append(content, meta, actions);
  }
  article.append(bubble);
  return article;
}

function renderMessages({ follow = true } = {}) {
  const messages = state.conversation.messages;
  if (!messages.length) {
    const hint = state.model
      ? `Chatting with ${state.model}.`
      : state.offline
        ? "Not connected to the server (see the message above)."
        : "Connecting to the server…";
    ui.messages.replaceChildren(
      el("div", { className: "empty" }, [
        el("h2", { textContent: "How can I help?" }),
        el("p", { textContent: `${hint} Enter sends, Shift+Enter starts a new line.` }),
      ]),
    );
    return;
  }
  const top = ui.messages.scrollTop;
  ui.messages.replaceChildren(...messages.map((m, i) => messageElement(m, i, i === messages.length - 1)));
  ui.messages.scrollTop = follow ? ui.messages.scrollHeight : top;
}

function nearBottom() {
  return ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
}

function paintStreaming() {
  const stream = state.stream;
  if (!stream || stream.conversation !== state.conversation) return;
  const article = ui.messages.querySelector(`.message[data-index="${stream.conversation.messages.length - 1}"]`);
  if (!article) return;
  const stick = nearBottom();
  fillContent(article.querySelector(".content"), stream.message, true);
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

// ------------------------------------------------------------------------------------------------
// Talking to the model

function numberSetting(value) {
  return value === "" || value === null || value === undefined || !Number.isFinite(Number(value)) ? null : Number(value);
}

function buildRequest(conversation) {
  const messages = conversation.system.trim() ? [{ role: "system", content: conversation.system }] : [];
  for (const { role, content } of conversation.messages) messages.push({ role, content });
  const request = { model: state.model, messages };
  const knobs = { temperature: state.settings.temperature, top_p: state.settings.top_p, max_tokens: state.settings.max_tokens };
  for (const [key, value] of Object.entries(knobs)) {
    const number = numberSetting(value);
    if (number !== null) request[key] = number;
  }
  return request;
}

function setBusy(busy) {
  const hadFocus = document.activeElement === ui.send || document.activeElement === ui.stop;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", String(busy));
  if (hadFocus || document.activeElement === document.body) (busy ? ui.stop : ui.prompt).focus();
}

function stopStreaming() {
  state.stream?.controller.abort();
}

async function ensureModel() {
  if (!state.model) await loadModel();
  return state.model !== null;
}

/** Stream the assistant's reply to the conversation as it stands (its last message is the user's). */
async function reply() {
  if (state.stream || !(await ensureModel())) return;
  hideError();
  const conversation = state.conversation;
  const request = buildRequest(conversation);
  const message = { role: "assistant", content: "", meta: {} };
  conversation.messages.push(message);
  const controller = new AbortController();
  state.stream = { controller, conversation, message };
  setBusy(true);
  renderMessages();
  const started = performance.now();
  let painting = null;
  let savedAt = started;
  try {
    for await (const chunk of streamChat(request, { apiKey: state.apiKey, signal: controller.signal })) {
      if (chunk.content) {
        message.content += chunk.content;
        painting ??= setTimeout(() => {
          painting = null;
          paintStreaming();
        }, 30);
        if (performance.now() - savedAt > 1000) {
          savedAt = performance.now();
          message.meta.streaming = true; // a reload mid-reply keeps what came so far, marked interrupted
          save(conversation);
        }
      }
      if (chunk.finishReason) message.meta.finish = chunk.finishReason;
      if (chunk.usage) message.meta.tokens = chunk.usage.completion_tokens;
    }
  } catch (err) {
    if (err.name === "AbortError") {
      message.meta.finish = "stopped";
    } else {
      message.meta.finish = "error";
      showError(err.message);
      if (err.kind === "auth") askForApiKey();
    }
  } finally {
    clearTimeout(painting);
    delete message.meta.streaming;
    message.meta.seconds = (performance.now() - started) / 1000;
    if (!message.content && (message.meta.finish === "stopped" || message.meta.finish === "error")) {
      conversation.messages.pop(); // nothing came: leave the user's message last, with Retry
    }
    state.stream = null;
    setBusy(false);
    if (conversation === state.conversation || store.loadConversation(conversation.id)) save(conversation); // not if deleted
    if (conversation === state.conversation) {
      renderMessages({ follow: nearBottom() }); // a reader who scrolled up stays where they are
      renderList();
      ui.status.textContent = message.meta.finish === "error" ? "The reply failed." : "Reply finished.";
    }
  }
}

function send() {
  const text = ui.prompt.value;
  if (!text.trim() || state.stream) return;
  const messages = state.conversation.messages;
  if (messages.length && messages[messages.length - 1].role === "user") messages.pop(); // it got no reply
  messages.push({ role: "user", content: text });
  ui.prompt.value = "";
  resizePrompt();
  save();
  renderList();
  renderMessages();
  reply();
}

function regenerate() {
  const messages = state.conversation.messages;
  if (state.stream || !messages.length) return;
  if (messages[messages.length - 1].role === "assistant") messages.pop();
  reply();
}

function resendEdited(index, text) {
  if (!text.trim() || state.stream) return;
  const messages = state.conversation.messages;
  messages.splice(index, messages.length - index, { role: "user", content: text });
  state.editing = null;
  save();
  renderList();
  reply();
}

function cancelEdit() {
  state.editing = null;
  renderMessages();
}

// ------------------------------------------------------------------------------------------------
// Server, settings, API key

async function loadModel() {
  try {
    const models = await listModels(state.apiKey);
    state.model = models[0] || null;
    state.offline = false;
    ui.model.textContent = state.model || "no model";
    if (!state.model) showError("The server lists no model.");
    else if (!ui.error.hidden && ui.errorText.textContent.includes("API key")) hideError();
    if (!state.stream) renderMessages({ follow: false });
  } catch (err) {
    state.offline = true;
    if (!state.stream) renderMessages({ follow: false });
    ui.model.textContent = "offline";
    showError(err.message);
    if (err.kind === "auth") askForApiKey();
  }
}

function askForApiKey() {
  ui.settings.open = true;
  ui.apiKey.focus();
}

function readSettings() {
  state.settings = { temperature: ui.temperature.value, top_p: ui.topP.value, max_tokens: ui.maxTokens.value };
  store.saveSettings(state.settings);
}

function updateSystemPreview() {
  const text = ui.system.value.trim().replace(/\s+/g, " ");
  ui.systemPreview.textContent = text ? (text.length > 60 ? text.slice(0, 59) + "…" : text) : "(default)";
}

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

// ------------------------------------------------------------------------------------------------
// Export / import / clear

function exportConversation() {
  const data = store.exportConversation(state.conversation, state.model, state.settings);
  const blob = new Blob([JSON.stringify(data, null, 2) + "\n"], { type: "application/json" });
  const slug = store.titleOf(state.conversation).replace(/[^\w\u4e00-\u9fff-]+/g, "-").replace(/^-|-$/g, "").slice(0, 40);
  const link = el("a", { href: URL.createObjectURL(blob), download: `${slug || "chat"}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function importFile(file) {
  try {
    const conversation = store.importConversation(JSON.parse(await file.text()));
    save(conversation);
    showConversation(conversation);
  } catch (err) {
    showError(`Could not import ${file.name}: ${err.message}`);
  }
}

function clearConversation() {
  stopStreaming();
  state.conversation.messages = [];
  state.editing = null;
  save();
  renderList();
  renderMessages();
}

// ------------------------------------------------------------------------------------------------
// Wiring

function onMessageAction(event) {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.classList.contains("copy-code")) {
    copyText(button.closest(".code-block").querySelector("code").textContent, button);
    return;
  }
  const article = button.closest(".message");
  const action = button.dataset.action;
  if (!article || !action) return;
  const index = Number(article.dataset.index);
  const message = state.conversation.messages[index];
  if (action === "copy") copyText(message.content, button);
  else if (action === "regenerate") regenerate();
  else if (action === "edit") {
    state.editing = index;
    renderMessages();
  } else if (action === "save-edit") resendEdited(index, article.querySelector(".edit-box").value);
  else if (action === "cancel-edit") cancelEdit();
}

function onStorage(event) {
  // another tab changed the conversations: refresh the list, and the open one unless this tab is using it
  const id = store.conversationIdOfKey(event.key);
  if (event.key !== null && id === null) return;
  if (id === state.conversation.id && !state.stream && state.editing === null) {
    const fresh = store.loadConversation(id);
    if (fresh) {
      state.conversation = fresh;
      ui.system.value = fresh.system;
      updateSystemPreview();
      renderMessages();
    }
  }
  if (state.renaming === null) renderList();
}

function start() {
  const notice = document.querySelector('meta[name="qwenlm-notice"]')?.content;
  if (notice) {
    ui.notice.textContent = notice;
    ui.notice.hidden = false;
  }
  ui.temperature.value = state.settings.temperature;
  ui.topP.value = state.settings.top_p;
  ui.maxTokens.value = state.settings.max_tokens;
  ui.apiKey.value = state.apiKey;

  const fromHash = store.loadConversation(decodeURIComponent(location.hash.slice(1)));
  showConversation(fromHash || store.listConversations()[0] || store.newConversation());

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (state.stream) stopStreaming();
    else if (ui.sidebar.classList.contains("open")) setSidebar(false);
  });
  ui.main.addEventListener("click", (event) => {
    if (ui.sidebar.classList.contains("open") && !event.target.closest("#sidebar-toggle")) setSidebar(false);
  });
  window.matchMedia("(max-width: 760px)").addEventListener("change", () => setSidebar(false));
  ui.prompt.addEventListener("input", resizePrompt);
  ui.stop.addEventListener("click", stopStreaming);
  ui.messages.addEventListener("click", onMessageAction);
  ui.newChat.addEventListener("click", () => showConversation(store.newConversation()));
  $("export").addEventListener("click", exportConversation);
  const clear = $("clear");
  clear.addEventListener("click", () => confirmTwice(clear, "Clear this chat?", clearConversation));
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) importFile(file);
    event.target.value = "";
  });
  $("error-close").addEventListener("click", hideError);
  $("sidebar-toggle").addEventListener("click", () => setSidebar(!ui.sidebar.classList.contains("open")));
  ui.system.addEventListener("input", () => {
    state.conversation.system = ui.system.value;
    updateSystemPreview();
    save();
    renderList();
  });
  for (const input of [ui.temperature, ui.topP, ui.maxTokens]) input.addEventListener("input", readSettings);
  ui.apiKey.addEventListener("change", () => {
    state.apiKey = ui.apiKey.value.trim();
    store.saveApiKey(state.apiKey);
    loadModel();
  });
  window.addEventListener("storage", onStorage);
  window.addEventListener("hashchange", () => openConversation(decodeURIComponent(location.hash.slice(1))));
  loadModel();
}

start();
