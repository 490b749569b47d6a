// The orderflow dashboard: the gateway's public API (GET /stats, /orders, /orders/{id}, the command
// endpoints) kept current by its event streams. Every event of /events/stream may change the
// figures and the list, so they are read again (at most every REFRESH_MS); the selected order's
// timeline comes from its own stream, which ends with the order.
//
// It holds no ambient authority: it signs in with a bearer token (from the URL fragment, which is
// never sent to a server, or pasted), keeps it in sessionStorage and sends it on every request, so
// a page of another site can make the browser send nothing that the gateway would act on. The one
// cookie it sets, for an operator, is the codec session: read by /codec/decode and /encode alone.
"use strict";

const REFRESH_MS = 500;
const CLOCK_REFRESH_MS = 15_000; // the completions per minute move with the clock too
const POLL_MS = 3_000; // a customer may not follow every order's stream: its list is read again
const RECONNECT_MS = 1_000;
const PAGE_SIZE = 50;
const TOKEN_KEY = "orderflow.token";
// the states from which a command can still take effect (the lifecycle answers if it cannot)
const APPROVABLE = new Set(["queued", "received", "validated", "awaiting_approval"]);
const CANCELLABLE = new Set(["queued", "received", "validated", "awaiting_approval", "approved", "paid", "shipping"]);
const IN_REVIEW = "awaiting_approval";

const $ = (selector) => document.querySelector(selector);
const ROLES_CLAIM = $('meta[name="orderflow-roles-claim"]').content;
// the order's workflow in the Temporal UI, `{order_id}` standing for the order's id
const WORKFLOW_URL = $('meta[name="orderflow-workflow-url"]').content;
const DEFAULT_CANCEL_REASON = "cancelled from the dashboard";

// who is signed in; `ended` aborts everything the session started (requests, streams)
const session = { token: null, subject: null, roles: new Set(), ended: null, timers: [] };
const view = { state: null, cursor: null, selected: null, orderStream: null, status: null };

function element(tag, text, className) {
  const made = document.createElement(tag);
  if (text !== undefined) made.textContent = text;
  if (className) made.className = className;
  return made;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const time = (iso) => new Date(iso).toLocaleTimeString(undefined, { hour12: false });
const money = (cents) => (cents / 100).toFixed(2);

// at most one run of `task` per `ms`, the last request always honoured
function throttled(task, ms) {
  let timer = null;
  let again = false;
  return function request() {
    if (timer) { again = true; return; }
    task();
    timer = setTimeout(() => { timer = null; if (again) { again = false; request(); } }, ms);
  };
}

// --- signing in ---------------------------------------------------------------------------------
// The token's claims, read for display only: the gateway verifies it on every request.
function claimsOf(token) {
  const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  const bytes = Uint8Array.from(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
  const claims = JSON.parse(new TextDecoder().decode(bytes));
  if (typeof claims !== "object" || claims === null) throw new Error("no claims");
  return claims;
}

function rolesIn(claims) {
  let roles = claims;
  for (const part of ROLES_CLAIM.split(".")) roles = roles?.[part];
  if (typeof roles === "string") roles = roles.split(" ");
  return new Set(Array.isArray(roles) ? roles : []);
}

const has = (...roles) => roles.some((role) => session.roles.has(role));
const seesEveryOrder = () => has("reviewer", "operator"); // the figures, every order's stream, Temporal

// the token of a sign-in link, taken out of the address bar (and so out of the history) at once
function tokenFromFragment() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token !== null) history.replaceState(null, "", location.pathname + location.search);
  return token;
}

// The Temporal UI of this machine decodes payloads with the codec session cookie (HttpOnly, sent to
// /codec only): an operator's sign-in sets it; any other sign-in, and every sign-out, clears it.
function codecSession(method, token) {
  fetch("/codec/session", { method, headers: { authorization: `Bearer ${token}` }, keepalive: true }).catch(() => {});
}

function signIn(token) {
  let claims;
  try { claims = claimsOf(token); } catch { return false; }
  sessionStorage.setItem(TOKEN_KEY, token);
  Object.assign(session, { token, subject: String(claims.sub ?? "?"), roles: rolesIn(claims) });
  session.ended = new AbortController();
  codecSession(has("operator") ? "POST" : "DELETE", token);
  showSession();
  start();
  return true;
}

function signOut(message) {
  if (session.token) codecSession("DELETE", session.token);
  sessionStorage.removeItem(TOKEN_KEY);
  session.ended?.abort();
  for (const timer of session.timers) clearInterval(timer);
  Object.assign(session, { token: null, subject: null, roles: new Set(), ended: null, timers: [] });
  Object.assign(view, { state: null, cursor: null, selected: null, orderStream: null, status: null });
  $("#orders tbody").replaceChildren();
  $("#detail").hidden = true;
  $("#cancel-dialog").close();
  showSignIn(message);
}

function showSignIn(message) {
  for (const id of ["#app", "#live", "#who", "#sign-out"]) $(id).hidden = true;
  $("#sign-in").hidden = false;
  $("#sign-in-message").textContent = message ?? "";
  $("#token").value = "";
}

function showSession() {
  $("#sign-in").hidden = true;
  for (const id of ["#app", "#live", "#who", "#sign-out"]) $(id).hidden = false;
  $("#who").textContent = `${session.subject} · ${[...session.roles].join(", ") || "no role"}`;
  $("#figures").hidden = !seesEveryOrder();
}

// --- the gateway --------------------------------------------------------------------------------
// Every request carries the token; a 401 (expired, revoked, not valid) ends the session.
async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    signal: options.signal ?? session.ended.signal,
    headers: { accept: "application/json", ...options.headers, authorization: `Bearer ${session.token}` },
  });
  if (response.status === 401) {
    signOut("The gateway did not accept the token (expired or not valid): sign in again.");
    throw new Error("signed out");
  }
  return response;
}

async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// what the gateway answered a request it refused, for a person
async function refusal(response) {
  const answer = await response.json().catch(() => ({ detail: response.statusText }));
  const detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail);
  return `refused (${response.status}): ${detail}`;
}

// Follow a server-sent event stream. EventSource cannot send an Authorization header, so fetch()
// reads it and this parses it as the SSE standard says, reconnecting with Last-Event-ID after a
// lost connection; it stops on a 204 (nothing more will come), on another refusal, or on `signal`.
async function followStream(path, { lastEventId = null, onData, onOpen, onLost, signal }) {
  let last = lastEventId;
  while (!signal.aborted) {
    try {
      const headers = last === null ? {} : { "last-event-id": last };
      const response = await api(path, { headers, signal });
      if (response.status === 204) return;
      if (!response.ok) throw new Error(`${path}: ${response.status}`, { cause: "refused" });
      onOpen?.();
      await readEvents(response.body, (id) => { last = id; }, onData);
    } catch (error) {
      if (signal.aborted || error.cause === "refused") return;
      onLost?.(error);
    }
    await sleep(RECONNECT_MS);
  }
}

async function readEvents(body, onId, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // a "\r" at the end may be the first half of a "\r\n": wait for what follows it
    const held = buffer.endsWith("\r") ? "\r" : "";
    const lines = buffer.slice(0, buffer.length - held.length).split(/\r\n|\r|\n/);
    buffer = lines.pop() + held;
    for (const line of lines) {
      if (line === "") {
        if (data.length) onData(data.join("\n"));
        data = [];
        continue;
      }
      const colon = line.indexOf(":"); // a comment (": ping") has an empty field name
      const field = colon === -1 ? line : line.slice(0, colon);
      const text = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") data.push(text);
      else if (field === "id" && !text.includes("\0")) onId(text);
    }
  }
}

// --- figures ------------------------------------------------------------------------------------
function renderStats(stats) {
  const states = $("#states");
  states.replaceChildren(stateChip(null, "all", stats.total));
  for (const [state, count] of Object.entries(stats.counts)) states.append(stateChip(state, state, count));
  $("#backlog").textContent = stats.admission.backlog;
  $("#running").textContent = stats.admission.running;
  $("#max-running").textContent = stats.admission.max_running;
  const minutes = stats.completed_per_minute; // oldest first, the minute under way last
  $("#this-minute").textContent = minutes.at(-1).count;
  $("#last-minute").textContent = minutes.at(-2).count;
  const highest = Math.max(1, ...minutes.map((minute) => minute.count));
  $("#sparkline").replaceChildren(...minutes.map((minute) => {
    const bar = element("span");
    bar.style.height = `${(100 * minute.count) / highest}%`;
    bar.title = `${time(minute.minute)}: ${minute.count}`;
    return bar;
  }));
}

function stateChip(state, label, count) {
  const chip = element("button", "", "chip");
  chip.type = "button";
  chip.dataset.state = state ?? "all";
  chip.setAttribute("aria-pressed", String(view.state === state));
  chip.append(element("span", label), element("strong", String(count)));
  chip.addEventListener("click", () => { view.state = state; refresh().catch(() => {}); });
  return chip;
}

// --- the list -----------------------------------------------------------------------------------
async function loadOrders(cursor) {
  const query = new URLSearchParams({ limit: PAGE_SIZE });
  if (view.state) query.set("state", view.state);
  if (cursor) query.set("cursor", cursor);
  return getJson(`/orders?${query}`);
}

function orderRow(order) {
  const row = element("tr");
  row.dataset.orderId = order.order_id;
  row.classList.toggle("selected", order.order_id === view.selected);
  row.append(
    element("td", order.order_id, "id"),
    element("td", order.state, `state ${order.state}`),
    element("td", money(order.amount_cents), "amount"),
    element("td", time(order.created_at), "created"),
    element("td", time(order.updated_at)),
  );
  row.addEventListener("click", () => select(order.order_id));
  return row;
}

function renderOrders(page, append) {
  const rows = page.items.map(orderRow);
  const body = $("#orders tbody");
  if (append) body.append(...rows); else body.replaceChildren(...rows);
  view.cursor = page.next_cursor;
  $("#more").hidden = !view.cursor;
  $("#orders-empty").hidden = body.children.length > 0;
}

// the figures (for those who may read them) and the first page, read again: every event may have
// changed them
async function refresh() {
  try {
    const [stats, page] = await Promise.all([seesEveryOrder() ? getJson("/stats") : null, loadOrders(null)]);
    if (stats) renderStats(stats);
    renderOrders(page, false);
    return stats;
  } catch (error) {
    if (session.token) setLive("error", `cannot read the gateway (${error.message})`);
    throw error;
  }
}

const refreshSoon = throttled(() => refresh().catch(() => {}), REFRESH_MS);

// --- the selected order -------------------------------------------------------------------------
function select(orderId) {
  view.orderStream?.abort();
  view.selected = orderId;
  view.status = null;
  for (const row of document.querySelectorAll("#orders tbody tr")) {
    row.classList.toggle("selected", row.dataset.orderId === orderId);
  }
  const detail = $("#detail");
  detail.hidden = false;
  $("#detail-id").textContent = orderId;
  $("#action-result").textContent = "";
  $("#timeline").replaceChildren();
  const workflow = $("#workflow-link");
  workflow.hidden = !seesEveryOrder();
  workflow.href = WORKFLOW_URL.replace("{order_id}", encodeURIComponent(orderId));
  // where the panel is under the list (a narrow screen) and out of sight, bring it up
  if (detail.getBoundingClientRect().top > window.innerHeight) detail.scrollIntoView();
  showActions();
  refreshStatus();
  view.orderStream = new AbortController();
  followStream(`/orders/${encodeURIComponent(orderId)}/events/stream`, {
    signal: AbortSignal.any([session.ended.signal, view.orderStream.signal]),
    onData: (data) => { addToTimeline(JSON.parse(data)); refreshStatus(); },
  });
}

async function showStatus() {
  const orderId = view.selected;
  const status = await getJson(`/orders/${encodeURIComponent(orderId)}`);
  if (orderId !== view.selected) return; // another order was selected meanwhile
  view.status = status;
  const state = $("#detail-state");
  state.textContent = status.state;
  state.className = `state ${status.state}`;
  $("#detail-step").textContent = status.step ? `step: ${status.step}` : `from the ${status.source.replace("_", " ")}`;
  showActions();
  const attempts = Object.entries(status.attempts ?? {}).map(([step, count]) => `${step} × ${count}`);
  listOrNone($("#attempts"), attempts);
  listOrNone($("#errors"), (status.recent_errors ?? []).map((error) =>
    `${time(error.at)} ${error.step} attempt ${error.attempt}: ${error.error}`));
}

// The buttons of the signed-in roles (the gateway decides; this only spares a refusal): reviewers
// and operators approve, never an order they placed; a customer cancels its own orders (the only
// ones it sees), a reviewer those in review, an operator any.
function showActions() {
  const status = view.status;
  const placedByMe = status?.placed_by != null && status.placed_by === session.subject;
  const approve = $("#approve");
  approve.hidden = !has("reviewer", "operator");
  approve.disabled = !status || !APPROVABLE.has(status.state) || placedByMe;
  approve.title = placedByMe ? "You placed this order: someone else approves it (four eyes)." : "";
  const cancel = $("#cancel");
  cancel.hidden = !has("customer", "reviewer", "operator");
  const mayCancel = has("operator", "customer") || (has("reviewer") && status?.state === IN_REVIEW);
  cancel.disabled = !status || !CANCELLABLE.has(status.state) || !mayCancel;
}

// only the live status (from the workflow) knows attempts and errors
function listOrNone(list, lines) {
  list.replaceChildren(...(lines.length ? lines.map((line) => element("li", line)) : [element("li", "none known", "muted")]));
}

const refreshStatus = throttled(() => showStatus().catch(() => {}), REFRESH_MS);

function addToTimeline(event) {
  const item = element("li");
  item.dataset.seq = event.seq;
  item.dataset.type = event.type;
  item.append(
    element("span", `#${event.seq}`, "seq"),
    element("span", time(event.occurred_at), "when"),
    element("span", event.type, `type ${event.type}`),
  );
  const fields = Object.entries(event.data).filter(([, value]) => value !== null);
  if (fields.length) item.append(fieldList(fields));
  // in seq order (a rejection outside any lifecycle has seq 0 and goes last)
  const timeline = $("#timeline");
  const later = [...timeline.children].find((other) => event.seq > 0 && (Number(other.dataset.seq) > event.seq || other.dataset.seq === "0"));
  timeline.insertBefore(item, later ?? null);
}

// an event's data as a list of its fields, each named in words
function fieldList(fields) {
  const list = element("dl");
  for (const [key, value] of fields) {
    const [name, text] = field(key, value);
    list.append(element("dt", name.replaceAll("_", " ")), element("dd", text));
  }
  return list;
}

// `amount_cents: 2500` reads "amount 25.00", `queued_at` a time of day, an address one line
function field(key, value) {
  if (key.endsWith("_cents")) return [key.slice(0, -"_cents".length), money(value)];
  if (key.endsWith("_at")) return [key, time(value)];
  return [key, readable(value)];
}

function readable(value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.map(readable).join("; ");
  if (value !== null && typeof value === "object") {
    return Object.values(value).filter((part) => part !== null && part !== "").map(readable).join(", ");
  }
  return String(value);
}

async function command(action, body) {
  const orderId = view.selected;
  const result = $("#action-result");
  result.textContent = "sending…";
  const response = await api(`/orders/${encodeURIComponent(orderId)}/${action}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  result.textContent = response.ok ? `${(await response.json()).type} accepted` : await refusal(response);
}

// a cancel cannot be taken back: it is sent only once confirmed in the dialog (with its reason)
function confirmCancel() {
  $("#cancel-order-id").textContent = view.selected;
  $("#cancel-reason").value = "";
  $("#cancel-reason").placeholder = DEFAULT_CANCEL_REASON;
  $("#cancel-dialog").showModal();
}

function cancelConfirmed() {
  const reason = $("#cancel-reason").value.trim() || DEFAULT_CANCEL_REASON;
  $("#cancel-dialog").close();
  command("cancel", { reason }).catch(() => {});
}

// an order by its id, whether or not the list shows it
async function find(orderId) {
  const message = $("#find-message");
  message.textContent = "";
  const response = await api(`/orders/${encodeURIComponent(orderId)}`);
  if (response.ok) select(orderId);
  else message.textContent = response.status === 404 ? `No order ${orderId}.` : await refusal(response);
}

// --- live ---------------------------------------------------------------------------------------
function setLive(state, text) {
  const live = $("#live");
  live.dataset.state = state;
  live.textContent = text;
}

function follow(position) {
  // from the figures' own position: nothing between reading them and following is missed
  followStream("/events/stream", {
    lastEventId: String(position),
    signal: session.ended.signal,
    onOpen: () => setLive("live", "live"),
    onLost: () => setLive("reconnecting", "reconnecting…"),
    onData: refreshSoon,
  });
  session.timers.push(setInterval(refreshSoon, CLOCK_REFRESH_MS));
}

function poll() {
  setLive("live", "live");
  session.timers.push(setInterval(refreshSoon, POLL_MS));
}

function start() {
  const ended = session.ended.signal;
  setLive("connecting", "connecting…");
  refresh().then(
    (stats) => { if (!ended.aborted) (stats ? follow(stats.position) : poll()); },
    () => setTimeout(() => { if (!ended.aborted) start(); }, 2000),
  );
}

$("#approve").addEventListener("click", () => command("approve", {}).catch(() => {}));
$("#cancel").addEventListener("click", confirmCancel);
$("#cancel-confirm").addEventListener("click", cancelConfirmed);
$("#cancel-keep").addEventListener("click", () => $("#cancel-dialog").close());
$("#find").addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  find($("#find-id").value).catch(() => {});
});
$("#more").addEventListener("click", async () => renderOrders(await loadOrders(view.cursor), true));
$("#sign-out").addEventListener("click", () => signOut("Signed out."));
$("#sign-in-form").addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  if (!signIn($("#token").value.trim())) $("#sign-in-message").textContent = "That is not a bearer token (a JWT).";
});

const remembered = tokenFromFragment() ?? sessionStorage.getItem(TOKEN_KEY);
if (!remembered || !signIn(remembered)) showSignIn(remembered ? "That is not a bearer token (a JWT)." : "");
