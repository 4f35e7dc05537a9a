// The run viewer's page: start a run, open one by id (kept in the URL hash, so a reload comes back to it), cancel.
import { api, get, store } from "./client.js";
import { $, RunView, el, notice } from "./run.js";

let current = null;

function open(runId) {
  if (current) current.stop();
  notice("");
  current = runId ? new RunView(runId) : null;
  if (!current) {
    $("run").hidden = true;
    return;
  }
  if (location.hash !== `#run=${runId}`) history.replaceState(null, "", `#run=${encodeURIComponent(runId)}`);
  if (!current.ended) current.follow();
}

function runFromHash() {
  const match = /^#run=(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : "";
}

// The tools this caller may use (so they change with the token); a failure here is most often a missing token.
async function loadTools() {
  const box = $("tools");
  box.querySelectorAll("label").forEach((n) => n.remove());
  try {
    const body = await (await api("v1/tools")).json();
    for (const tool of body.tools || []) {
      const label = el("label", "tool");
      const tick = el("input");
      tick.type = "checkbox";
      tick.value = tool.name;
      label.title = tool.description || "";
      label.append(tick, document.createTextNode(" " + tool.name));
      box.append(label);
    }
    if ($("notice").textContent.startsWith("tools: ")) notice("");
  } catch (error) {
    notice(`tools: ${error.message}`);
  }
}

async function start(event) {
  event.preventDefault();
  const tools = [...$("tools").querySelectorAll("input:checked")].map((n) => n.value);
  $("start").disabled = true;
  try {
    const response = await api("v1/runs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ message: $("message").value, tools }),
    });
    const body = await response.json();
    open(get(body, "run_id"));
  } catch (error) {
    notice(error.message);
  } finally {
    $("start").disabled = false;
  }
}

async function cancel() {
  if (!current) return;
  try {
    await api(`v1/runs/${encodeURIComponent(current.runId)}:cancel`, { method: "POST" });
  } catch (error) {
    notice(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = store.token();
  $("token").addEventListener("input", () => store.setToken($("token").value));
  $("token").addEventListener("change", loadTools);
  $("start-form").addEventListener("submit", start);
  $("open-form").addEventListener("submit", (e) => {
    e.preventDefault();
    open($("open-id").value.trim());
  });
  $("cancel").addEventListener("click", cancel);
  window.addEventListener("pagehide", () => current && current.save());
  window.addEventListener("hashchange", () => {
    if (runFromHash() !== (current && current.runId)) open(runFromHash());
  });
  loadTools();
  if (runFromHash()) open(runFromHash());
});
