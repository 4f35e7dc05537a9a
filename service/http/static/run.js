// One watched run: follows GET v1/runs/{id}/events (resuming after the last seq drawn) and draws each event kind.
// Model and tool text is untrusted: it only ever goes into the page as text (textContent, text nodes).
import { api, get, ms, num, sse, store } from "./client.js";

export const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["final_response", "error"]);
const RECONNECT_MS = [250, 500, 1000, 2000, 5000];

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function brief(value, limit = 300) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text && text.length > limit ? text.slice(0, limit) + " …" : text || "";
}

export function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

export class RunView {
  constructor(runId) {
    this.runId = runId;
    store.forgetOthers(runId);
    this.events = store.events(runId);
    this.lastSeq = this.events.length ? store.lastSeq(runId) : 0;
    this.calls = new Map();
    this.turnText = new Map();
    this.ended = false;
    this.abort = new AbortController();
    this.reset();
    for (const record of this.events) this.render(record);
  }

  reset() {
    $("run").hidden = false;
    $("run-id").textContent = this.runId;
    for (const id of ["answer", "calls", "events", "run-model"]) $(id).replaceChildren();
    $("final").replaceChildren();
    $("final").hidden = true;
    this.state("RUNNING");
  }

  state(name) {
    $("run-state").textContent = name.toLowerCase();
    $("run-state").className = `badge state-${name.toLowerCase()}`;
    $("cancel").disabled = ["SUCCEEDED", "FAILED", "CANCELLED"].includes(name);
  }

  conn(text) {
    $("conn").textContent = text;
  }

  stop() {
    this.abort.abort();
    this.save();
  }

  // Follows the run until its last event, reconnecting after the last seq seen whenever the stream breaks.
  async follow() {
    for (let attempt = 0; !this.ended && !this.abort.signal.aborted; attempt++) {
      try {
        this.conn(attempt ? "reconnecting…" : "connecting…");
        const headers = this.lastSeq ? { "Last-Event-ID": String(this.lastSeq) } : {};
        const response = await api(`v1/runs/${encodeURIComponent(this.runId)}/events`, {
          headers,
          signal: this.abort.signal,
        });
        this.conn("live");
        for await (const message of sse(response.body, this.abort.signal)) {
          this.receive(message);
          attempt = 0;
        }
      } catch (error) {
        if (this.abort.signal.aborted) return;
        if (error.status && error.status < 500 && error.status !== 429) {
          notice(error.message); // not found, denied, bad request: trying again changes nothing
          this.conn("");
          return;
        }
      }
      if (!this.ended) await new Promise((r) => setTimeout(r, RECONNECT_MS[Math.min(attempt, 4)]));
    }
    this.conn(this.ended ? "ended" : "");
  }

  receive(message) {
    const event = JSON.parse(message.data);
    const seq = num(get(event, "seq")) || num(message.id);
    if (seq <= this.lastSeq) return; // already drawn (a replay overlapping what a reload restored)
    const kind = message.type !== "message" ? message.type : Object.keys(event).find((k) => typeof event[k] === "object" && k !== "time");
    const first = num(get(event, "first_seq")) || seq;
    if (first !== this.lastSeq + 1) notice(`events ${this.lastSeq + 1}–${first - 1} of this run were not received`);
    const data = get(event, kind, {});
    const record = { seq, first, kind, time: get(event, "time"), data };
    this.lastSeq = seq;
    this.events.push(record);
    this.render(record);
    this.saveSoon();
  }

  // Writing every event to storage would copy the whole run per event; a few times a second is enough, since the
  // events and the last seq are saved together (a reload resumes after what was saved, whatever came since), and
  // the page saves at once when it is left (`save`, on pagehide) or the run ends.
  saveSoon() {
    if (this.ended) this.save();
    else if (!this.saveTimer) this.saveTimer = setTimeout(() => this.save(), 200);
  }

  save() {
    clearTimeout(this.saveTimer);
    this.saveTimer = null;
    store.save(this.runId, this.events, this.lastSeq);
  }

  render(record) {
    this.logRow(record);
    const handler = this[`on_${record.kind}`];
    if (handler) handler.call(this, record.data, record);
    if (TERMINAL.has(record.kind)) {
      this.ended = true;
      this.conn("ended");
    }
  }

  // When an event happened, from the run's first event: "+1.234 s".
  since(time) {
    const at = Date.parse(time);
    if (Number.isNaN(at)) return "";
    if (this.t0 === undefined) this.t0 = at;
    return `+${((at - this.t0) / 1000).toFixed(3)} s`;
  }

  logRow(record) {
    const row = el("li", `ev ev-${record.kind}`);
    row.dataset.seq = String(record.seq);
    row.dataset.firstSeq = String(record.first);
    row.append(el("span", "seq", record.first < record.seq ? `${record.first}–${record.seq}` : record.seq));
    row.append(el("span", "at", this.since(record.time)));
    row.append(el("span", "kind", record.kind));
    row.append(el("span", "what", brief(record.data, 160)));
    if (isBreaker(record.kind, record.data)) row.append(el("span", "mark breaker", "breaker"));
    if (record.kind === "execution_failed") row.append(el("span", "mark deadletter", "dead letter"));
    const list = $("events");
    const following = list.scrollTop + list.clientHeight >= list.scrollHeight - 4; // at the end: stay there
    list.append(row);
    if (following) list.scrollTop = list.scrollHeight;
    $("event-count").textContent = `${this.events.length} (last seq ${record.seq})`;
  }

  // --- the event kinds ---

  on_run_started(d) {
    $("run-model").textContent = `${get(d, "model", "")} · tools: ${(get(d, "tools", []) || []).join(", ")}`;
  }

  on_thinking(d) {
    this.turnBlock(get(d, "turn", 0), "thinking").append(document.createTextNode(get(d, "text", "")));
  }

  on_text_delta(d) {
    this.turnBlock(get(d, "turn", 0), "text").append(document.createTextNode(get(d, "text", "")));
  }

  turnBlock(turn, part) {
    const key = `${turn}:${part}`;
    if (!this.turnText.has(key)) {
      const block = el("p", `turn ${part}`);
      block.dataset.turn = String(turn);
      $("answer").append(block);
      this.turnText.set(key, block);
    }
    return this.turnText.get(key);
  }

  call(callId, name) {
    if (!this.calls.has(callId)) {
      const card = el("li", "call running");
      card.dataset.callId = callId;
      const head = el("div", "call-head");
      const title = el("strong", "name", name || "?");
      const status = el("span", "badge status", "forming");
      head.append(title, el("code", "call-id", callId), status);
      const input = el("pre", "input");
      const log = el("ul", "call-log");
      card.append(head, input, log);
      $("calls").append(card);
      this.calls.set(callId, { card, head, title, status, input, log, parts: [] });
    }
    return this.calls.get(callId);
  }

  // A breaker or dead-letter mark on the call's card, once.
  mark(c, kind, label) {
    if (c.card.classList.contains(kind)) return;
    c.card.classList.add(kind);
    c.head.append(el("span", `mark ${kind}`, label));
  }

  line(callId, className, text) {
    const row = el("li", className, text);
    this.call(callId).log.append(row);
    return row;
  }

  on_tool_call(d) {
    this.call(get(d, "call_id"), get(d, "name"));
  }

  on_tool_call_delta(d) {
    this.call(get(d, "call_id")).input.append(document.createTextNode(get(d, "partial_json", "")));
  }

  on_tool_call_ready(d, record) {
    const c = this.call(get(d, "call_id"), get(d, "name"));
    c.input.textContent = JSON.stringify(get(d, "input", {}), null, 1);
    c.status.textContent = "running";
    c.started = record && record.time ? Date.parse(record.time) : null;
  }

  on_tool_data_part(d) {
    const c = this.call(get(d, "call_id"));
    c.parts.push(get(d, "json", ""));
    this.line(get(d, "call_id"), "part", `data part ${num(get(d, "index")) + 1}/${num(get(d, "total"))}`);
  }

  on_tool_result_chunk(d) {
    const total = get(d, "total");
    const label = `chunk ${num(get(d, "index")) + 1}${total !== undefined ? "/" + total : ""}`;
    this.line(get(d, "call_id"), "chunk", `${label}: ${brief(this.data(d))}`);
  }

  on_tool_retry(d) {
    const text = `retry ${get(d, "attempt", 0)}/${get(d, "max_attempts", 0)} in ${ms(get(d, "wait"))} ms: ${get(d, "error", "")}`;
    this.line(get(d, "call_id"), "retry", text);
  }

  on_tool_fallback(d) {
    const c = this.call(get(d, "call_id"));
    this.line(get(d, "call_id"), "fallback", `fallback ${get(d, "primary")} → ${get(d, "fallback")}: ${get(d, "reason", "")}`);
    if (isBreaker("tool_fallback", d)) this.mark(c, "breaker", "breaker open");
  }

  on_tool_result(d) {
    const c = this.call(get(d, "call_id"), get(d, "name"));
    const status = String(get(d, "status", "TOOL_STATUS_OK")).replace("TOOL_STATUS_", "").toLowerCase();
    c.card.classList.remove("running");
    c.card.classList.add(`status-${status}`);
    c.status.textContent = status;
    c.status.className = `badge status status-${status}`;
    const facts = [`${ms(get(d, "duration"))} ms`];
    if (num(get(d, "attempts")) > 1) facts.push(`${get(d, "attempts")} attempts`);
    if (get(d, "cache_hit")) facts.push("cached");
    if (get(d, "answered_by")) facts.push(`answered by ${get(d, "answered_by")}`);
    this.line(get(d, "call_id"), "result", `${status} in ${facts.join(", ")}`);
    if (status === "circuit_open") this.mark(c, "breaker", "breaker open");
    const error = get(d, "error");
    if (error) this.line(get(d, "call_id"), "error", error);
    const data = this.data(d);
    if (data !== undefined) {
      const details = el("details", "data");
      details.append(el("summary", null, brief(data, 120)), el("pre", null, JSON.stringify(data, null, 1)));
      c.log.append(details);
    }
  }

  // The data of a result or chunk: inline, or joined from the tool_data_part events just before it.
  data(d) {
    if (num(get(d, "data_parts")) > 0) {
      const c = this.call(get(d, "call_id"));
      const joined = c.parts.join("");
      c.parts = [];
      try {
        return JSON.parse(joined);
      } catch {
        return joined;
      }
    }
    return get(d, "data");
  }

  on_execution_failed(d) {
    const c = this.call(get(d, "call_id"), get(d, "tool"));
    this.line(get(d, "call_id"), "deadletter", `dead letter ${get(d, "execution_id")}: ${get(d, "message", "")}`);
    this.mark(c, "deadletter", "dead letter");
  }

  on_model_retry(d) {
    this.turnBlock(get(d, "turn", 0), "notice").textContent =
      `model retry ${get(d, "attempt", 0)}/${get(d, "max_attempts", 0)} in ${ms(get(d, "wait"))} ms: ${get(d, "error", "")}`;
  }

  on_run_recovered(d) {
    $("answer").append(el("p", "turn notice", `recovered from step ${get(d, "step_no")}: ${get(d, "reason", "")}`));
  }

  on_usage(d) {
    $("run-model").dataset.tokens = `${num(get(d, "total_input_tokens"))} in / ${num(get(d, "total_output_tokens"))} out`;
  }

  on_final_response(d) {
    // The answer is the last turn's text, already drawn as it streamed: mark it rather than print it twice.
    const last = this.turnText.get(`${get(d, "turns", 0)}:text`);
    if (last && last.textContent === get(d, "text", "")) last.classList.add("final-turn");
    else $("answer").append(el("p", "turn text final-turn", get(d, "text", "")));
    const box = $("final");
    box.className = "final ok";
    box.replaceChildren(
      el(
        "p",
        "stats",
        `${get(d, "stop_reason", "")} · ${get(d, "turns", 0)} turn(s), ${get(d, "tool_calls", 0)} tool call(s), ` +
          `${num(get(d, "input_tokens"))} in / ${num(get(d, "output_tokens"))} out tokens, ${ms(get(d, "duration"))} ms`,
      ),
    );
    box.hidden = false;
    this.state("SUCCEEDED");
  }

  on_error(d) {
    const box = $("final");
    const code = get(d, "code", "UNKNOWN");
    box.className = "final failed";
    box.replaceChildren(el("h3", null, `Error ${code}`), el("p", null, get(d, "message", "")));
    if (get(d, "retryable")) box.append(el("p", "stats", "retryable"));
    box.hidden = false;
    this.state(code === "CANCELLED" ? "CANCELLED" : "FAILED");
  }
}

function isBreaker(kind, d) {
  if (kind === "tool_result") return String(get(d, "status", "")).endsWith("CIRCUIT_OPEN");
  if (kind === "tool_fallback") return /circuit/i.test(get(d, "reason", ""));
  return false;
}

