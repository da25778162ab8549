// The console's pages. Each is page(view, ctx, arg) → {onEvent(event), leave()}; the shell routes to them
// and hands them every stream event (or {event: "poll"} while the stream is down: then they reload).

import { api, followWorkflow, query } from "./api.js";
import { drawDag, setStatus } from "./dag.js";
import { ago, badge, confirmDialog, flash, h, json, time } from "./util.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "budget_exceeded"]);
const STATUSES = ["", "pending", "running", "succeeded", "failed", "cancelled", "budget_exceeded"];

// Runs fn at most once per `ms`, the last call winning: a burst of events is one reload.
function debounced(fn, ms = 250) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

// ---- Workflows ------------------------------------------------------------------------------------
function workflows(view, ctx) {
  const status = h("select", { testid: "filter-status", onchange: () => load() },
                   STATUSES.map((s) => h("option", { value: s }, s || "any status")));
  const name = h("input", { type: "search", placeholder: "name contains…", testid: "filter-name", oninput: () => render() });
  const body = h("tbody");
  const rows = new Map();  // workflow id → its list item
  view.append(h("h1", {}, "Workflows"), h("div", { class: "filters" }, status, name),
              h("table", { testid: "workflow-list" },
                h("thead", {}, h("tr", {}, ["workflow", "name", "status", "tasks", "parent", "created"].map((c) => h("th", {}, c)))),
                body));

  const matches = (w) => (!status.value || w.status === status.value)
    && (!name.value || (w.name || "").toLowerCase().includes(name.value.toLowerCase()));
  function render() {
    const items = [...rows.values()].filter(matches).sort((a, b) => b.created_at - a.created_at).slice(0, 200);
    body.replaceChildren(...items.map((w) => h("tr", { testid: "workflow-row", dataset: { id: w.workflow_id, status: w.status } },
      h("td", {}, h("a", { href: `#/workflows/${w.workflow_id}`, testid: "workflow-link" }, w.workflow_id)),
      h("td", {}, w.name || "–"), h("td", {}, badge(w.status, "workflow-status")), h("td", {}, w.tasks ?? "–"),
      h("td", {}, w.parent?.workflow_id ? h("a", { href: `#/workflows/${w.parent.workflow_id}` }, "parent") : ""),
      h("td", {}, time(w.created_at)))));
  }
  async function load() {
    const answer = await api(`/v1/workflows${query({ status: status.value, limit: 200 })}`);
    rows.clear();
    for (const w of answer.workflows) rows.set(w.workflow_id, w);
    render();
  }
  const reload = debounced(() => load().catch((e) => flash(view, e.message)), 500);
  load().catch((e) => flash(view, e.message));
  return {
    onEvent(e) {
      if (e.event === "poll") return reload();
      if (e.event !== "workflow") return;
      const known = rows.get(e.workflow_id);
      if (known && known.at > e.at) return;  // an older change arriving late
      rows.set(e.workflow_id, { ...known, ...e });
      render();
    },
  };
}

// ---- Workflow detail ------------------------------------------------------------------------------
// Follows the workflow's own stream (/v1/workflows/{id}/events), which also carries its children's
// questions and events: the DAG recolours, the selected task shows its progress and streamed text, and
// pending questions (of the whole family) can be answered here.
const MAX_PUBLISHED = 100;  // published events shown, the newest
const MAX_TEXT = 400_000;  // characters of a task's streamed text kept on the page

function workflow(view, ctx, id) {
  let wf = null, svg = null, selected = null, source = null, lastId = 0, ended = false, retry = null;
  const seen = new Map();  // task id → `at` of the newest change applied
  const outputs = new Map();  // task id → {attempt, text, length}: its attempt's streamed text so far
  const progress = new Map();  // task id → the newest progress of its newest attempt
  const questions = new Map();  // "workflow/task" → the pending question
  const children = new Map();  // child workflow id → {workflow_id, name, status}
  const published = [];
  const head = h("div", { class: "head" });
  const dagBox = h("div", { class: "dag-box" });
  const detail = h("div", { class: "task-detail", testid: "task-detail" }, h("p", { class: "muted" }, "Select a task."));
  const family = h("div", { class: "family", testid: "family" });
  const asking = h("div", { class: "questions", testid: "questions" });
  const events = h("div", { class: "published", testid: "published" });
  let streamPre = null, progressBox = null;  // the selected task's, updated in place as events come
  view.append(head, family, asking, h("div", { class: "split" }, dagBox, detail), events);
  const canAnswer = ctx.may("workflows.answer") || ctx.may("workflows.answer_own");

  function renderHead() {
    const canCancel = (ctx.may("workflows.cancel") || ctx.may("workflows.cancel_own")) && !TERMINAL.has(wf.status);
    head.replaceChildren(
      h("h1", {}, wf.name || "workflow", " ", h("code", {}, wf.workflow_id)),
      h("p", {}, badge(wf.status, "detail-status"), ` created ${time(wf.created_at)}`,
        wf.finished_at ? `, finished ${time(wf.finished_at)}` : "",
        canCancel ? h("button", { class: "danger", testid: "cancel-workflow", onclick: cancel }, "Cancel workflow") : ""),
      wf.error ? h("p", { class: "error", testid: "workflow-error" }, wf.error) : "");
  }
  function renderFamily() {
    const kids = [...children.values()];
    family.replaceChildren(
      wf?.parent?.workflow_id ? h("span", {}, "Parent: ", h("a", { href: `#/workflows/${wf.parent.workflow_id}`, testid: "parent-link" }, wf.parent.workflow_id), " ") : "",
      kids.length ? h("span", {}, "Children: ", kids.map((c) => [h("a", { href: `#/workflows/${c.workflow_id}`, testid: "child-link" }, c.name || c.workflow_id), " ", badge(c.status), " "])) : "");
  }
  function renderProgress(t) {
    const p = progress.get(t.id);
    progressBox.replaceChildren(...(p ? [
      p.percent != null ? h("progress", { max: 100, value: p.percent }) : "",
      ` ${p.percent != null ? `${p.percent}% ` : ""}${p.message || ""}`] : ["–"]));
  }
  function renderTask() {
    const t = wf?.tasks.find((x) => x.id === selected);
    if (!t) return;
    const row = (k, v) => h("tr", {}, h("th", {}, k), h("td", {}, v));
    const out = outputs.get(t.id);
    progressBox = h("span", { testid: "task-progress" });
    streamPre = h("pre", { class: "stream", testid: "task-stream" }, out?.text || "");
    renderProgress(t);
    detail.replaceChildren(
      h("h2", {}, "Task ", h("code", {}, t.id)),
      h("table", { class: "kv" },
        row("status", badge(t.status, "task-status")), row("capability", t.capability),
        row("attempts", h("span", { testid: "task-attempts" }, `${t.attempts}${t.max_attempts ? ` of ${t.max_attempts}` : ""}`)),
        row("agent", t.ran_on || "–"), row("queued", time(t.queued_at)), row("started", time(t.started_at)),
        row("finished", time(t.finished_at)), t.reason ? row("reason", t.reason) : "", row("progress", progressBox)),
      t.error ? h("div", { testid: "task-error", class: "error" }, `${t.error.type}: ${t.error.message}`) : "",
      (t.errors || []).length > 1 ? h("details", {}, h("summary", {}, `all errors (${t.errors.length})`), json(t.errors)) : "",
      out ? h("div", {}, h("h3", {}, `output (attempt ${out.attempt})`), streamPre) : "",
      t.result !== null && t.result !== undefined ? h("div", {}, h("h3", {}, "result"), json(t.result)) : "");
  }
  // Each question's form is made once and kept while the question is pending: what a person is typing
  // survives the events that come meanwhile.
  const forms = new Map();  // "workflow/task" → its element
  function questionForm(key, q) {
    const [wfId, taskId] = key.split("/");
    const input = h("textarea", { rows: 2, testid: "answer-input", placeholder: "your answer" });
    // A string answer is sent as typed; with a schema for anything else, what is typed is JSON.
    const asJson = h("input", { type: "checkbox", testid: "answer-json", checked: !!q.schema && q.schema.type !== "string" });
    const error = h("p", { class: "error", testid: "answer-error" });
    const submit = async (ev) => {
      ev.preventDefault();
      let answer = input.value;
      try { if (asJson.checked) answer = JSON.parse(answer); } catch { error.textContent = "That is not JSON."; return; }
      try {
        await api(`/v1/workflows/${encodeURIComponent(wfId)}/tasks/${encodeURIComponent(taskId)}/input`, { method: "POST", body: { answer } });
        questions.delete(key);
        renderQuestions();
      } catch (e) { error.textContent = e.message; }
    };
    return h("div", { class: "question", testid: "question", dataset: { workflow: wfId, task: taskId, key: q.key } },
      h("p", {}, h("strong", {}, "Question"), ` from task ${taskId}${wfId === id ? "" : ` of workflow ${wfId}`}: `,
        h("span", { testid: "question-text" }, q.question)),
      q.schema ? h("details", {}, h("summary", {}, "expected answer"), json(q.schema)) : "",
      canAnswer ? h("form", { onsubmit: submit }, input, h("label", {}, asJson, " JSON"), " ",
                    h("button", { type: "submit", testid: "answer-submit" }, "Answer"), error) : "");
  }
  function renderQuestions() {
    for (const [key, q] of questions) {
      if (forms.get(key)?.dataset.key !== String(q.key)) forms.set(key, questionForm(key, q));
    }
    for (const key of [...forms.keys()]) if (!questions.has(key)) forms.delete(key);
    asking.replaceChildren(...forms.values());
  }
  function renderPublished() {
    events.replaceChildren(...(published.length ? [h("h2", {}, "Published events"), h("table", { testid: "published-list" },
      h("tbody", {}, published.map((e) => h("tr", { testid: "published-event" }, h("td", {}, time(e.at)),
        h("td", {}, e.workflow_id === id ? e.task_id : `${e.workflow_id}/${e.task_id}`), h("td", {}, h("code", {}, e.topic)),
        h("td", {}, e.truncated ? h("span", { class: "muted" }, "(not retained)") : JSON.stringify(e.data))))))] : []));
  }
  function select(taskId) {
    selected = taskId;
    svg?.querySelectorAll("g.node").forEach((g) => g.classList.toggle("selected", g.dataset.task === taskId));
    renderTask();
  }
  async function load() {
    wf = await api(`/v1/workflows/${encodeURIComponent(id)}`);
    seen.clear();
    svg = drawDag(wf.tasks, select);
    dagBox.replaceChildren(svg);
    renderHead();
    renderFamily();
    if (!selected) selected = (wf.tasks.find((t) => t.error || t.input) || {}).id ?? null;
    if (selected) select(selected);
  }
  async function cancel() {
    if (!await confirmDialog(`Cancel workflow ${id}? Its unfinished tasks are cancelled.`)) return;
    try { wf = await api(`/v1/workflows/${encodeURIComponent(id)}/cancel`, { method: "POST" }); load(); }
    catch (e) { flash(view, e.message); }
  }
  const reload = debounced(() => load().catch((e) => flash(view, e.message)), 400);

  // The attempt's text so far. A chunk carries its offset (in characters), so what a reconnect's overlap
  // repeats is not shown twice; text past the log's limit came back without its text, and is marked.
  function output(taskId, attempt) {
    const out = outputs.get(taskId);
    if (out && out.attempt >= attempt) return out.attempt === attempt ? out : null;
    const fresh = { attempt, text: "", length: 0, gap: false };  // a new attempt streams from the start
    outputs.set(taskId, fresh);
    if (taskId === selected) renderTask();
    return fresh;
  }
  function show(taskId, out, text) {
    out.text += text;
    if (out.text.length > MAX_TEXT) out.text = out.text.slice(-MAX_TEXT / 2);  // the tail is what matters
    if (taskId !== selected || !streamPre) return;
    if (out.text.length < streamPre.textContent.length) streamPre.textContent = out.text;
    else streamPre.append(text);
  }
  function chunk(e) {
    const out = output(e.task_id, e.attempt);
    if (!out) return;  // an earlier attempt's
    const missing = "\n[… output not retained …]\n";
    if (typeof e.text !== "string") {
      if (!out.gap) show(e.task_id, out, missing);
      out.gap = true;
      return;
    }
    const chars = Array.from(e.text);
    const text = e.offset >= out.length ? (e.offset > out.length && !out.gap ? missing : "") + e.text
                                        : chars.slice(out.length - e.offset).join("");
    out.gap = false;
    out.length = Math.max(out.length, e.offset + chars.length);
    if (text) show(e.task_id, out, text);
  }
  function taskChange(e) {
    if (!wf || (seen.get(e.task_id) || 0) > e.at) return;  // older than what is shown
    seen.set(e.task_id, e.at);
    const t = wf.tasks.find((x) => x.id === e.task_id);
    if (!t) return;
    Object.assign(t, { status: e.status, attempts: e.attempt, ran_on: e.ran_on, reason: e.reason,
                       queued_at: e.queued_at, started_at: e.started_at, finished_at: e.finished_at },
                  e.error ? { error: e.error } : {});
    if (e.attempt && outputs.has(t.id)) output(t.id, e.attempt);
    if (TERMINAL.has(e.status) && questions.delete(`${id}/${t.id}`)) renderQuestions();
    setStatus(svg, t);
    if (t.id === selected) renderTask();
    if (e.status === "succeeded" && t.id === selected) reload();  // its result is not in the event
  }
  function adoptViews(snapshot) {
    for (const v of [snapshot.workflow, ...snapshot.children]) {
      if (v.parent?.workflow_id === id) children.set(v.workflow_id, { workflow_id: v.workflow_id, name: v.name, status: v.status });
      for (const t of v.tasks) {
        const key = `${v.workflow_id}/${t.id}`;
        if (t.input) questions.set(key, t.input); else questions.delete(key);
        if (v.workflow_id === id && t.progress) progress.set(t.id, t.progress);
      }
    }
  }
  const handlers = {
    snapshot(s) { adoptViews(s); renderQuestions(); reload(); },
    task(e) {
      if (e.workflow_id === id) taskChange(e);
      else if (TERMINAL.has(e.status) && questions.delete(`${e.workflow_id}/${e.task_id}`)) renderQuestions();
    },
    workflow(e) {
      if (e.workflow_id === id) return reload();  // status, error and result: read them whole
      if (children.has(e.workflow_id)) { Object.assign(children.get(e.workflow_id), { status: e.status }); renderFamily(); }
    },
    progress(e) {
      if (e.workflow_id !== id || (progress.get(e.task_id)?.attempt || 0) > e.attempt) return;
      progress.set(e.task_id, e.progress);
      const t = wf?.tasks.find((x) => x.id === e.task_id);
      if (t && t.id === selected && progressBox) renderProgress(t);
    },
    chunk(e) { if (e.workflow_id === id) chunk(e); },
    input(e) { questions.set(`${e.workflow_id}/${e.task_id}`, e); renderQuestions(); },
    answer(e) { if (questions.delete(`${e.workflow_id}/${e.task_id}`)) renderQuestions(); },
    published(e) { published.push(e); published.splice(0, published.length - MAX_PUBLISHED); renderPublished(); },
    child(e) {
      if (e.workflow_id !== id) return;
      children.set(e.child_workflow_id, { workflow_id: e.child_workflow_id, name: e.name, status: "pending" });
      renderFamily();
    },
    end() { ended = true; source.close(); reload(); },
  };
  for (const [name, fn] of Object.entries(handlers)) {
    handlers[name] = (data, eventId) => { lastId = Math.max(lastId, eventId); fn(data); };
  }
  function open() {
    ended = false;
    source = followWorkflow(id, lastId, handlers, () => {  // refused: the REST view, and try again later
      reload();
      retry = setTimeout(open, 5000);
    });
  }
  load().then(open).catch((e) => { view.replaceChildren(h("p", { class: "error", testid: "detail-error" }, e.message)); });
  return {
    onEvent(e) {
      if (e.event === "poll") return reload();
      // A finished workflow may run again (its dead letter replayed): then follow it again.
      if (ended && e.event === "workflow" && e.workflow_id === id && !TERMINAL.has(e.status)) open();
    },
    leave() { clearTimeout(retry); source?.close(); },
  };
}

// ---- Agents ---------------------------------------------------------------------------------------
const SAMPLES = 60;
const history = new Map();  // agent name → its last in_flight samples (kept across visits to the page)

function sparkline(samples, max) {
  const w = 120, hgt = 24, top = Math.max(1, max);
  const points = samples.map((v, i) => `${(i * w) / (SAMPLES - 1)},${hgt - (v / top) * (hgt - 2) - 1}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", hgt); svg.setAttribute("class", "spark");
  svg.dataset.testid = "sparkline";
  // A baseline, so that an idle agent shows a flat line rather than nothing.
  svg.innerHTML = `<line x1="0" y1="${hgt - 1}" x2="${w}" y2="${hgt - 1}" class="base"/><polyline points="${points}"/>`;
  return svg;
}

function agents(view) {
  const body = h("tbody");
  const caps = h("div", { class: "caps", testid: "capability-breakers" });
  const f = {
    capability: h("input", { type: "search", placeholder: "capability", testid: "agents-filter-capability" }),
    status: h("select", { testid: "agents-filter-status" }, ["", "alive", "lost"].map((s) => h("option", { value: s }, s || "any status"))),
  };
  for (const input of Object.values(f)) input.addEventListener("change", () => tick());
  const filters = () => Object.fromEntries(Object.entries(f).map(([k, v]) => [k, v.value.trim()]).filter(([, v]) => v));
  view.append(h("h1", {}, "Agents"), h("div", { class: "filters" }, Object.values(f)),
              h("table", { testid: "agent-list" }, h("thead", {}, h("tr", {},
                ["agent", "status", "last heartbeat", "capabilities", "in flight", "breaker", "activity"].map((c) => h("th", {}, c)))), body),
              h("h2", {}, "Capabilities"), caps);
  async function load() {
    // Every matching agent, a page (at most 1000) at a time, by name.
    const answer = { agents: [], capabilities: {} };
    for (let after; ;) {
      const page = await api(`/v1/agents${query({ ...filters(), limit: 1000, after })}`);
      answer.agents.push(...page.agents);
      Object.assign(answer.capabilities, page.capabilities);
      if (!page.next) break;
      after = page.next;
    }
    body.replaceChildren(...answer.agents.map((a) => {
      const samples = history.get(a.name) || [];
      samples.push(a.status === "alive" ? (a.in_flight || 0) : 0);
      while (samples.length > SAMPLES) samples.shift();
      history.set(a.name, samples);
      return h("tr", { testid: "agent-row", dataset: { name: a.name, status: a.status } },
        h("td", {}, a.name), h("td", {}, badge(a.status)), h("td", {}, ago(a.last_heartbeat)),
        h("td", {}, (a.capabilities || []).join(", ")), h("td", {}, `${a.in_flight ?? 0} / ${a.concurrency ?? "?"}`),
        h("td", {}, badge(a.breaker?.state || "closed")), h("td", {}, sparkline(samples, a.concurrency || 1)));
    }));
    caps.replaceChildren(...Object.entries(answer.capabilities).sort(([a], [b]) => (a < b ? -1 : 1)).map(([c, v]) =>
      h("span", { class: "cap" }, c, " ", badge(v.breaker?.state || "closed"))));
  }
  const tick = () => load().catch((e) => flash(view, e.message));
  tick();
  const timer = setInterval(tick, 2000);  // in-flight samples for the sparklines; heartbeats are not events
  return { onEvent: (e) => { if (e.event === "agents") tick(); }, leave: () => clearInterval(timer) };
}

// ---- Dead letters ---------------------------------------------------------------------------------
function deadLetters(view, ctx) {
  const f = {
    capability: h("input", { placeholder: "capability", testid: "dlq-filter-capability" }),
    reason: h("input", { placeholder: "reason contains", testid: "dlq-filter-reason" }),
    workflow_id: h("input", { placeholder: "workflow id", testid: "dlq-filter-workflow" }),
    status: h("select", { testid: "dlq-filter-status" }, ["dead", "replayed", ""].map((s) => h("option", { value: s }, s || "any"))),
  };
  for (const input of Object.values(f)) input.addEventListener("change", () => load());
  const filters = () => Object.fromEntries(Object.entries(f).map(([k, v]) => [k, v.value.trim()]).filter(([, v]) => v));
  const body = h("tbody");
  const detail = h("div", { class: "dl-detail", testid: "dlq-detail" });
  const canReplay = ctx.may("dlq.replay"), canDelete = ctx.may("dlq.delete");
  view.append(h("h1", {}, "Dead letters"),
    h("div", { class: "filters" }, Object.values(f),
      canReplay ? h("button", { testid: "dlq-replay-filtered", onclick: replayMatching }, "Replay all matching") : ""),
    h("table", { testid: "dlq-list" }, h("thead", {}, h("tr", {},
      ["id", "reason", "capability", "workflow", "received", "status", ""].map((c) => h("th", {}, c)))), body),
    detail);

  async function act(what, call) {
    try { await call(); } catch (e) { flash(view, `${what}: ${e.message}`); }
    load();
  }
  async function replayMatching() {
    const { status, ...rest } = filters();
    if (!await confirmDialog(`Replay every dead letter matching ${JSON.stringify(rest)}?`)) return;
    act("replay", async () => {
      const r = await api("/v1/dlq/replay", { method: "POST", body: rest });
      flash(view, `Replaying ${r.matched} dead letters at ${r.rate_per_s}/s.`, "info");
    });
  }
  async function show(id) {
    detail.replaceChildren(h("h2", {}, "Dead letter ", h("code", {}, id)), json(await api(`/v1/dlq/${encodeURIComponent(id)}`)));
  }
  async function load() {
    const answer = await api(`/v1/dlq${query({ ...filters(), limit: 200 })}`);
    body.replaceChildren(...answer.dead_letters.map((d) => h("tr", { testid: "dlq-row", dataset: { id: d.id, workflow: d.workflow_id || "" } },
      h("td", {}, h("a", { href: "javascript:void 0", onclick: () => show(d.id) }, d.id)), h("td", {}, d.reason),
      h("td", {}, d.capability || "–"),
      h("td", {}, d.workflow_id ? h("a", { href: `#/workflows/${d.workflow_id}` }, d.workflow_id) : "–"),
      h("td", {}, time(d.received_at)), h("td", {}, badge(d.status)),
      h("td", {},
        canReplay && d.status === "dead" ? h("button", { testid: "dlq-replay", onclick: async () => {
          if (await confirmDialog(`Replay dead letter ${d.id}?`)) act("replay", () => api(`/v1/dlq/${d.id}/replay`, { method: "POST" }));
        } }, "Replay") : "",
        canDelete ? h("button", { class: "danger", testid: "dlq-delete", onclick: async () => {
          if (await confirmDialog(`Delete dead letter ${d.id}? This cannot be undone.`)) act("delete", () => api(`/v1/dlq/${d.id}`, { method: "DELETE" }));
        } }, "Delete") : ""))));
  }
  const reload = debounced(() => load().catch((e) => flash(view, e.message)), 300);
  load().catch((e) => flash(view, e.message));
  return { onEvent: (e) => { if (e.event === "dlq" || e.event === "poll") reload(); } };
}

// ---- Controls -------------------------------------------------------------------------------------
function controls(view, ctx) {
  const state = h("div", { testid: "control-state" });
  const capability = h("input", { placeholder: "capability (empty: all)", testid: "control-capability" });
  const may = ctx.may("control");
  const action = (name, label, text) => h("button", { testid: `control-${name}`, class: name === "stop-all" ? "danger" : "",
    disabled: !may, onclick: async () => {
      const cap = capability.value.trim();
      if (!await confirmDialog(text(cap))) return;
      try {
        const body = name === "stop-all" ? undefined : (cap ? { capability: cap } : undefined);
        show(await api(`/v1/control/${name}`, { method: "POST", body }));
      } catch (e) { flash(view, e.message); }
    } }, label);
  view.append(h("h1", {}, "Controls"), state,
    may ? h("div", { class: "filters" }, capability,
      action("pause", "Pause", (c) => `Pause dispatching ${c ? `of ${c}` : "of everything"}?`),
      action("resume", "Resume", (c) => `Resume ${c || "everything (this also lifts stop-all)"}?`),
      action("stop-all", "Stop all", () => "Engage the emergency stop? Nothing is dispatched and agents take no new work."))
      : h("p", { class: "muted" }, "Your role may not change the controls."));
  function show(s) {
    state.replaceChildren(h("table", { class: "kv" },
      h("tr", {}, h("th", {}, "emergency stop"), h("td", { testid: "state-stopped" }, s.stopped ? "ON" : "off")),
      h("tr", {}, h("th", {}, "paused"), h("td", { testid: "state-paused" }, s.paused ? "everything" : "no")),
      h("tr", {}, h("th", {}, "paused capabilities"), h("td", {}, (s.paused_capabilities || []).join(", ") || "none"))));
  }
  show(ctx.control || {});
  return { onEvent: (e) => { if (e.event === "control") show(e); if (e.event === "poll") api("/v1/control").then(show); } };
}

export const pages = { workflows: (v, c, arg) => (arg ? workflow(v, c, arg) : workflows(v, c)), agents, dlq: deadLetters, controls };
