// The page's side of the OpenAI API: the model list and streamed chat completions (SSE read from a
// fetch body, cancelled with an AbortSignal, which closes the connection: the server then frees the
// request's slot). Every failure becomes an ApiError whose message a person can act on.

export class ApiError extends Error {
  /** kind: "auth" (401), "http" (any other error status), "network" (no answer), "stream" (cut off). */
  constructor(message, { status = 0, kind = "http", code = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.kind = kind;
    this.code = code;
  }
}

function headers(apiKey) {
  const out = { "Content-Type": "application/json" };
  if (apiKey) out.Authorization = `Bearer ${apiKey}`;
  return out;
}

async function call(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`Cannot reach the server at ${location.host}: is qwenlm still running?`, { kind: "network" });
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = "";
  let code = null;
  try {
    const body = await response.json();
    message = body?.error?.message || "";
    code = body?.error?.code || null;
  } catch {
    // not an OpenAI error object (a proxy's page, say): the status line below says enough
  }
  if (response.status === 401) {
    const detail = message ? ` (${message})` : "";
    return new ApiError(`This server needs an API key${detail}. Enter it under Settings → API key.`, {
      status: 401,
      kind: "auth",
      code,
    });
  }
  const text = message || `${response.status} ${response.statusText || "error"}`;
  return new ApiError(`The server refused the request: ${text}`, { status: response.status, code });
}

/** The served model ids (GET /v1/models). */
export async function listModels(apiKey) {
  const response = await call("/v1/models", { headers: headers(apiKey) });
  const body = await response.json();
  return (body.data || []).map((model) => model.id);
}

/** Split SSE text into complete events' data payloads; returns [payloads, rest of the buffer]. */
export function parseEvents(buffer) {
  const payloads = [];
  const events = buffer.split(/\r?\n\r?\n/);
  const rest = events.pop();
  for (const event of events) {
    const data = event
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""));
    if (data.length) payloads.push(data.join("\n"));
  }
  return [payloads, rest];
}

/**
 * Stream a chat completion. Yields {content, finishReason, usage} per chunk; throws ApiError, or the
 * AbortError of `signal` when stopped.
 */
export async function* streamChat(request, { apiKey, signal }) {
  const body = JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } });
  const response = await call("/v1/chat/completions", { method: "POST", headers: headers(apiKey), body, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new ApiError("The connection to the server was lost in the middle of the reply.", { kind: "stream" });
      }
      if (chunk.done) break;
      let payloads;
      [payloads, buffer] = parseEvents(buffer + chunk.value);
      for (const payload of payloads) {
        if (payload === "[DONE]") return;
        let event;
        try {
          event = JSON.parse(payload);
        } catch {
          throw new ApiError(`The server sent an event that is not JSON: ${payload.slice(0, 80)}`, { kind: "stream" });
        }
        if (event.error) {
          throw new ApiError(`The server stopped the reply: ${event.error.message}`, { kind: "stream", code: event.error.code });
        }
        const choice = event.choices?.[0];
        if (choice?.finish_reason) finished = true;
        yield { content: choice?.delta?.content || "", finishReason: choice?.finish_reason || null, usage: event.usage || null };
      }
    }
  } finally {
    reader.releaseLock();
  }
  if (!finished) throw new ApiError("The connection to the server was lost in the middle of the reply.", { kind: "stream" });
}
