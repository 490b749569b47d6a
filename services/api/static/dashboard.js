// The orderflow dashboard: the gateway's public API (GET /stats, /orders, /orders/{id}, the command
// endpoints) kept current by its event streams. Every event of /events/stream may change the
// figures and the list, so they are read again (at most every REFRESH_MS); the selected order's
// timeline comes from its own stream, which ends with the order.
"use strict";

const REFRESH_MS = 500;
const CLOCK_REFRESH_MS = 15_000; // the completions per minute move with the clock too
const PAGE_SIZE = 50;
const TERMINAL = new Set(["completed", "cancelled", "failed", "terminated"]);
// the states from which a command can still take effect (the lifecycle answers if it cannot)
const APPROVABLE = new Set(["queued", "received", "validated", "awaiting_approval"]);
const CANCELLABLE = new Set(["queued", "received", "validated", "awaiting_approval", "approved", "paid", "shipping"]);

const view = { state: null, cursor: null, selected: null, orderStream: null };

const $ = (selector) => document.querySelector(selector);

function element(tag, text, className) {
  const made = document.createElement(tag);
  if (text !== undefined) made.textContent = text;
  if (className) made.className = className;
  return made;
}

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

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

const time = (iso) => new Date(iso).toLocaleTimeString(undefined, { hour12: false });
const money = (cents) => (cents / 100).toFixed(2);

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
    element("td", time(order.created_at)),
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

// the figures and the first page, read again: every event may have changed them
async function refresh() {
  try {
    const [stats, page] = await Promise.all([getJson("/stats"), loadOrders(null)]);
    renderStats(stats);
    renderOrders(page, false);
    return stats;
  } catch (error) {
    setLive("error", `cannot read the gateway (${error.message})`);
    throw error;
  }
}

const refreshSoon = throttled(() => refresh().catch(() => {}), REFRESH_MS);

// --- the selected order -------------------------------------------------------------------------
function select(orderId) {
  if (view.orderStream) view.orderStream.close();
  view.selected = orderId;
  for (const row of document.querySelectorAll("#orders tbody tr")) {
    row.classList.toggle("selected", row.dataset.orderId === orderId);
  }
  $("#detail").hidden = false;
  $("#detail-id").textContent = orderId;
  $("#action-result").textContent = "";
  $("#timeline").replaceChildren();
  refreshStatus();
  const stream = new EventSource(`/orders/${encodeURIComponent(orderId)}/events/stream`);
  stream.onmessage = (message) => {
    const event = JSON.parse(message.data);
    addToTimeline(event);
    refreshStatus();
    if (TERMINAL.has(event.type)) stream.close(); // the stream ends with the order
  };
  view.orderStream = stream;
}

async function showStatus() {
  const orderId = view.selected;
  const status = await getJson(`/orders/${encodeURIComponent(orderId)}`);
  if (orderId !== view.selected) return; // another order was selected meanwhile
  const state = $("#detail-state");
  state.textContent = status.state;
  state.className = `state ${status.state}`;
  $("#detail-step").textContent = status.step ? `step: ${status.step}` : `from the ${status.source.replace("_", " ")}`;
  $("#approve").disabled = !APPROVABLE.has(status.state);
  $("#cancel").disabled = !CANCELLABLE.has(status.state);
  const attempts = Object.entries(status.attempts ?? {}).map(([step, count]) => `${step} × ${count}`);
  listOrNone($("#attempts"), attempts);
  listOrNone($("#errors"), (status.recent_errors ?? []).map((error) =>
    `${time(error.at)} ${error.step} attempt ${error.attempt}: ${error.error}`));
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
  const details = Object.keys(event.data).length ? JSON.stringify(event.data) : "";
  item.append(
    element("span", `#${event.seq}`, "seq"),
    element("span", time(event.occurred_at), "when"),
    element("span", event.type, `type ${event.type}`),
    element("code", details),
  );
  // in seq order (a rejection outside any lifecycle has seq 0 and goes last)
  const timeline = $("#timeline");
  const later = [...timeline.children].find((other) => event.seq > 0 && (Number(other.dataset.seq) > event.seq || other.dataset.seq === "0"));
  timeline.insertBefore(item, later ?? null);
}

async function command(action, body) {
  const orderId = view.selected;
  const result = $("#action-result");
  result.textContent = "sending…";
  const response = await fetch(`/orders/${encodeURIComponent(orderId)}/${action}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({ detail: response.statusText }));
  result.textContent = response.ok
    ? `${answer.type} accepted`
    : `refused (${response.status}): ${typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail)}`;
}

// --- live ---------------------------------------------------------------------------------------
function setLive(state, text) {
  const live = $("#live");
  live.dataset.state = state;
  live.textContent = text;
}

function follow(position) {
  // from the figures' own position: nothing between reading them and following is missed, and the
  // browser resumes with Last-Event-ID after a lost connection
  const stream = new EventSource(`/events/stream?last_event_id=${position}`);
  stream.onopen = () => setLive("live", "live");
  stream.onerror = () => setLive("reconnecting", "reconnecting…");
  stream.onmessage = refreshSoon;
  setInterval(refreshSoon, CLOCK_REFRESH_MS);
}

$("#approve").addEventListener("click", () => command("approve", { reviewer: "dashboard" }));
$("#cancel").addEventListener("click", () => command("cancel", { reason: "cancelled from the dashboard" }));
$("#more").addEventListener("click", async () => renderOrders(await loadOrders(view.cursor), true));
function start() {
  refresh().then((stats) => follow(stats.position), () => setTimeout(start, 2000));
}

start();
