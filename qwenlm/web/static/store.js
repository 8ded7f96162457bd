// Conversations and settings, kept in this browser's localStorage (nothing is stored on the server).
//
// Each conversation is its own key ("qwenlm.chat.<id>"), so two tabs chatting in two conversations
// never overwrite each other. Messages keep the raw text the model produced; rendering is display only.
//
// conversation = {id, title, system, messages: [{role: "user"|"assistant", content, meta?}], created, updated}

export const DEFAULT_SYSTEM = "You are a helpful assistant.";
const PREFIX = "qwenlm.chat.";
const SETTINGS = "qwenlm.settings";
const API_KEY = "qwenlm.apiKey";

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

export function newConversation(system = DEFAULT_SYSTEM) {
  const now = Date.now();
  return { id: newId(), title: "", system, messages: [], created: now, updated: now };
}

/** A conversation's name in the list: its title, else the start of its first message. */
export function titleOf(conversation) {
  if (conversation.title) return conversation.title;
  const first = conversation.messages.find((m) => m.role === "user");
  const text = first ? first.content.trim().replace(/\s+/g, " ") : "";
  return text ? (text.length > 48 ? text.slice(0, 47) + "…" : text) : "New chat";
}

function isConversation(value) {
  return (
    value &&
    typeof value.id === "string" &&
    Array.isArray(value.messages) &&
    value.messages.every((m) => (m.role === "user" || m.role === "assistant") && typeof m.content === "string")
  );
}

export function loadConversation(id) {
  try {
    const value = JSON.parse(localStorage.getItem(PREFIX + id));
    return isConversation(value) ? value : null;
  } catch {
    return null;
  }
}

/** Every stored conversation, the most recently used first. */
export function listConversations() {
  const out = [];
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (key && key.startsWith(PREFIX)) {
      const conversation = loadConversation(key.slice(PREFIX.length));
      if (conversation) out.push(conversation);
    }
  }
  return out.sort((a, b) => b.updated - a.updated);
}

export function saveConversation(conversation, { touch = true } = {}) {
  if (touch) conversation.updated = Date.now();
  try {
    localStorage.setItem(PREFIX + conversation.id, JSON.stringify(conversation));
  } catch (err) {
    throw new Error(`This browser's storage is full (${err.name}): export and delete old conversations.`);
  }
}

export function deleteConversation(id) {
  localStorage.removeItem(PREFIX + id);
}

/** The storage key's conversation id, or null for other keys (for the "storage" event of other tabs). */
export function conversationIdOfKey(key) {
  return key && key.startsWith(PREFIX) ? key.slice(PREFIX.length) : null;
}

export function loadSettings() {
  try {
    return { temperature: "", top_p: "", max_tokens: "", ...JSON.parse(localStorage.getItem(SETTINGS) || "{}") };
  } catch {
    return { temperature: "", top_p: "", max_tokens: "" };
  }
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadApiKey() {
  return localStorage.getItem(API_KEY) || "";
}

export function saveApiKey(key) {
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
}

/** The exported file: OpenAI-style messages (system first), so the file can be sent to the API as it is. */
export function exportConversation(conversation, model, settings) {
  const system = conversation.system ? [{ role: "system", content: conversation.system }] : [];
  return {
    format: "qwenlm-chat",
    version: 1,
    title: titleOf(conversation),
    model,
    settings,
    created: new Date(conversation.created).toISOString(),
    exported: new Date().toISOString(),
    messages: [...system, ...conversation.messages.map(({ role, content }) => ({ role, content }))],
  };
}

/** A conversation from an exported file (or any {messages: [...]} JSON); throws Error on anything else. */
export function importConversation(data) {
  const messages = data && Array.isArray(data.messages) ? data.messages : null;
  const valid = (m) => m && ["system", "user", "assistant"].includes(m.role) && typeof m.content === "string";
  if (!messages || !messages.every(valid)) {
    throw new Error('Not a conversation file: expected {"messages": [{"role": …, "content": "…"}, …]}.');
  }
  const conversation = newConversation(messages[0]?.role === "system" ? messages[0].content : DEFAULT_SYSTEM);
  conversation.title = typeof data.title === "string" ? data.title : "";
  conversation.messages = messages.filter((m) => m.role !== "system").map(({ role, content }) => ({ role, content }));
  return conversation;
}
