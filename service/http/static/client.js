// The viewer's client side of the HTTP API: the caller's token and the open run's events in the tab's storage,
// JSON calls with the bearer token, and a text/event-stream parser for fetch() bodies. EventSource is not used: it
// can send no Authorization header, and a token in the URL would end up in access logs and history.

// Protobuf JSON names fields in lowerCamelCase unless the server keeps the proto names: read either.
const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
export const get = (obj, name, fallback) => {
  if (obj == null) return fallback;
  const value = obj[name] !== undefined ? obj[name] : obj[camel(name)];
  return value === undefined ? fallback : value;
};
export const num = (value) => Number(value || 0); // uint64 fields arrive as strings
export const ms = (duration) => (duration ? Math.round(parseFloat(duration) * 1000) : 0); // "0.212s"

// --- storage: the token and, per run, the events seen so far (so a reload redraws them and resumes after them) ---

export const store = {
  token: () => sessionStorage.getItem("viewer:token") || "",
  setToken: (t) => sessionStorage.setItem("viewer:token", t),
  lastSeq: (runId) => num(sessionStorage.getItem(`viewer:run:${runId}:seq`)),
  events(runId) {
    try {
      return JSON.parse(sessionStorage.getItem(`viewer:run:${runId}:events`) || "[]");
    } catch {
      return [];
    }
  },
  // Only the open run is kept: it is the one a reload comes back to, and the tab's storage is small (~5 MB).
  forgetOthers(runId) {
    for (const key of Object.keys(sessionStorage)) {
      if (key.startsWith("viewer:run:") && !key.startsWith(`viewer:run:${runId}:`)) sessionStorage.removeItem(key);
    }
  },
  save(runId, events, lastSeq) {
    try {
      sessionStorage.setItem(`viewer:run:${runId}:events`, JSON.stringify(events));
      sessionStorage.setItem(`viewer:run:${runId}:seq`, String(lastSeq));
    } catch {
      // Over the storage quota: keep nothing, so a reload replays the run from its start rather than from a seq
      // whose events it could not redraw.
      sessionStorage.removeItem(`viewer:run:${runId}:events`);
      sessionStorage.removeItem(`viewer:run:${runId}:seq`);
    }
  },
};

export async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const token = store.token();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...init, headers });
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const error = new Error(`${body.code || response.status}: ${body.message || response.statusText}`);
  error.status = response.status;
  return error;
}

// --- SSE over fetch: parse text/event-stream (https://html.spec.whatwg.org/#event-stream-interpretation) ---

export async function* sse(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, type: "message", data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || signal.aborted) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop(); // a line still coming (a lone trailing \r is taken as an end: harmless here)
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) yield { id: event.id, type: event.type, data: event.data.join("\n") };
          event = { id: null, type: "message", data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") event.data.push(value);
          else if (field === "event") event.type = value;
          else if (field === "id") event.id = value;
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}
