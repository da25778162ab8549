// The console's one way to the platform: the /v1 REST API with the session's token, and the event stream.

const TOKEN_KEY = "switchboard.token";

export const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
export const setToken = (value) => value ? sessionStorage.setItem(TOKEN_KEY, value) : sessionStorage.removeItem(TOKEN_KEY);

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const query = (params) => {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""));
  return q.toString() ? `?${q}` : "";
};

const EVENTS = ["task", "workflow", "agents", "dlq", "control"];
const POLL_MS = 3000;
const RETRY_STREAM_MS = 15000;

// Live updates: one EventSource on /v1/events (a browser's EventSource cannot send headers, so the token
// goes as ?access_token=). When the stream fails, `onEvent({event: "poll"})` every few seconds lets the
// pages reload instead, until the stream works again.
export function follow(onEvent, onState) {
  let source = null, poller = null;
  const open = () => {
    source = new EventSource(`/v1/events${query({ access_token: token() })}`);
    source.onopen = () => { stopPolling(); onState("live"); };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {  // refused (401, 503): EventSource gives up
        source.close();
        startPolling();
        setTimeout(open, RETRY_STREAM_MS);
      } else {
        onState("reconnecting");  // the browser reconnects by itself
      }
    };
    for (const name of EVENTS) {
      source.addEventListener(name, (message) => onEvent({ ...JSON.parse(message.data), event: name, id: Number(message.lastEventId) }));
    }
  };
  const startPolling = () => {
    onState("polling");
    if (!poller) poller = setInterval(() => onEvent({ event: "poll" }), POLL_MS);
  };
  const stopPolling = () => { if (poller) { clearInterval(poller); poller = null; } };
  open();
  return () => { stopPolling(); source?.close(); };
}

// One workflow's stream (/v1/workflows/{id}/events): `handlers` by event name (snapshot, task, workflow,
// progress, chunk, input, answer, published, child, end), each given the change and the event's id.
// The browser reconnects by itself with Last-Event-ID, so nothing is missed or repeated; `after` resumes
// a new EventSource (one opened after the stream ended or was refused) where the last one stopped.
export const WORKFLOW_EVENTS = ["snapshot", "task", "workflow", "progress", "chunk", "input", "answer", "published", "child", "end"];

export function followWorkflow(id, after, handlers, onClosed) {
  const params = { access_token: token(), last_event_id: after || undefined };
  const source = new EventSource(`/v1/workflows/${encodeURIComponent(id)}/events${query(params)}`);
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) onClosed(); };  // refused (404, 503)
  for (const name of WORKFLOW_EVENTS) {
    source.addEventListener(name, (message) => handlers[name]?.(JSON.parse(message.data), Number(message.lastEventId) || 0));
  }
  return source;
}
