"use strict";
// The netboot dashboard: plain JavaScript over the REST API (/api/v1), no framework, no build.
//
// * Authentication is the HttpOnly session cookie set at /login; every change also sends the
//   netboot_csrf cookie's value in X-CSRF-Token (double submit, netboot/web/auth.py).
// * Filtering, sorting and paging happen on the server (GET /machines?q=&state=&sort=&offset=),
//   so a page of 50 rows costs the same with 10 machines or 10,000.
// * One EventSource per browser (/api/v1/events/stream, held by a SharedWorker: connect)
//   tells the page what changed; a view reloads what it shows at most once per RELOAD_MS
//   however many events arrive.
// * Text from the inventory is only ever set as textContent, never parsed as HTML.

const API = "/api/v1";
const PAGE = 50;
const RELOAD_MS = 700;
const STATES = ["discovered", "enrolled", "booting", "installing", "installed", "registered",
  "failed", "reinstall"];
// The states an operator's "installed" takes a machine out of (netboot.lifecycle: enrolled,
// booting, installing or reinstall → installed).
const MARKABLE = ["enrolled", "booting", "installing", "reinstall"];
// The states of a machine whose installed OS took its hostname and k3s node name from its
// config (enroll.renamed_installed).
const RUNS_ITS_NAME = ["installing", "installed", "registered"];

// ---- helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, opts = {}) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = cookie("netboot_csrf");
  let payload;
  if (opts.raw !== undefined) {
    payload = opts.raw;
    headers["Content-Type"] = opts.contentType || "text/plain";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(API + path, {method, headers, body: payload,
    credentials: "same-origin"});
  if (resp.status === 401) {
    location.href = "/login";
    throw new ApiError(401, null);
  }
  const type = resp.headers.get("Content-Type") || "";
  const data = resp.status === 204 ? null
    : type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok && !opts.allowError) throw new ApiError(resp.status, data);
  return {status: resp.status, data};
}

function ago(t) {
  if (!t) return "—";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

// An age on the page ("4 min", "2 h 5 min ago") is counted again every AGE_MS, not only
// when an event reloads the view: after a storm, with nothing arriving, the list's
// "Unchanged for" said "12 s" of a machine stuck for an hour, and a timeline's newest
// step "3 s ago" all afternoon.
const AGE_MS = 10_000;

function age(t, after = "") {
  if (!t) return "—";
  return h("span", {class: "age", dataset: {at: t, after}}, ago(t) + after);
}

setInterval(() => {
  for (const el of document.querySelectorAll("span.age")) {
    el.textContent = ago(Number(el.dataset.at)) + el.dataset.after;
  }
}, AGE_MS);

function iso(t) {
  return t ? new Date(t * 1000).toISOString().replace(".000Z", "Z") : "—";
}

function stateBadge(state) {
  return h("span", {class: `state state-${state}`}, state);
}

function notice(text, kind = "ok") {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.className = `notice notice-${kind}`;
  el.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

function inventoryHealth(inventory) {
  // The inventory's state as this server's /healthz tells it (the event stream's "inventory"
  // as it opens and when it changes; GET /status's too): a banner on every page while it is
  // not ok (writes refused: a full or read-only database, told by whichever server of the
  // inventory found it), gone once it is. Each tab asked GET /status for it every 15 s.
  const el = document.getElementById("inventory-health");
  const bad = inventory && inventory.state !== "ok";
  el.hidden = !bad;
  el.textContent = bad ? `Inventory ${inventory.state}: ${inventory.detail || ""}` : "";
}

function standingWarnings(warnings) {
  // What stands that the operator must fix (GET /status's "warnings"; the event stream's
  // "warnings" as it changes): machines an older register command registered, clusters
  // named alike but for case, a clock behind the inventory. Only the log said them.
  const el = document.getElementById("warnings");
  const list = warnings || [];
  el.hidden = !list.length;
  el.replaceChildren(...list.map((w) => h("div", {class: "warning", dataset: {kind: w.kind}},
    w.message)));
}

function failed(err) {
  notice(err instanceof ApiError && err.body && err.body.field
    ? `${err.body.field}: ${err.message}` : err.message, "error");
}

function throttled(fn) {
  // Runs fn at most once per RELOAD_MS and never while its last run is under way, and once
  // more after the last call. A storm's events asked a reload every RELOAD_MS whether the
  // last had answered or not: a search over 100,000 machines (~2 s, a scan) had three of
  // them running at once, per open tab.
  let busy = false;
  let again = false;
  async function run() {
    busy = true;
    try { await fn(); } catch (err) { failed(err); }
    setTimeout(() => {
      busy = false;
      if (again) { again = false; run(); }
    }, RELOAD_MS);
  }
  return () => {
    if (busy) { again = true; return; }
    run();
  };
}

let lists = null; // clusters and profiles for the approve/enroll selects
async function choices() {
  if (!lists) {
    const [clusters, profiles] = await Promise.all([api("GET", "/clusters"),
      api("GET", "/profiles")]);
    lists = {clusters: clusters.data.map((c) => c.name), profiles: profiles.data.map((p) => p.name)};
  }
  return lists;
}

function select(name, values, {empty = "—", value = ""} = {}) {
  return h("select", {name, "aria-label": name},
    h("option", {value: ""}, empty),
    values.map((v) => h("option", {value: v, selected: v === value}, v)));
}

// ---- live events -------------------------------------------------------------------------

let view = null; // the current view: {onEvent(ev), onMissed(), close()}

// One event stream for all the tabs of a browser. Chromium opens at most 6 HTTP/1.1
// connections to one server (netboot's HTTPS is HTTP/1.1) and each tab's EventSource held one
// for good: an operator with a tab per suspect machine had, from the sixth, every request of
// every tab waiting for a connection that never came free.
// * A SharedWorker (/ui/stream.js) holds the one stream and passes each message to every tab.
//   It needs no secure context, so the dashboard over plain HTTP from another host
//   (http.plain_api: allow) shares one stream too: Web Locks, the way before, exist only
//   over HTTPS or on localhost, and there each tab had its own stream, the seventh stalled.
// * Without SharedWorker (Chrome on Android, Safari before 16) but with Web Locks: the tab
//   holding the lock below opens the stream and passes each message to the others
//   (BroadcastChannel); when it closes, another takes the lock and opens the stream from the
//   last event any tab saw (?last_event_id=), so the gap is given, not lost.
// * With neither, each tab has its own stream, as before.
// Every stream resumes after a drop: EventSource sends the last event's id (Last-Event-ID)
// and the server gives what came meanwhile, or "missed" (the view reloads what it shows).
const STREAM_LOCK = "netboot-event-stream";
const KINDS = ["machine", "inventory", "warnings", "missed"];

function connect() {
  const live = document.getElementById("live");
  function deliver(kind, data) {
    if (kind === "live") {
      live.textContent = data ? "live" : "reconnecting…";
      live.className = data ? "live on" : "live off";
    } else if (kind === "machine") {
      // The machines view's counts (GET /status) carry the discovered badge's number.
      if (!(view && view.countsDiscovered)) refreshDiscovered();
      if (view && view.onEvent) view.onEvent(JSON.parse(data));
    } else if (kind === "inventory") inventoryHealth(JSON.parse(data));
    else if (kind === "warnings") standingWarnings(JSON.parse(data));
    else if (kind === "missed" && view && view.onMissed) view.onMissed();
  }
  if (!(window.SharedWorker && shared(deliver))) elected(deliver);
}

function elected(deliver) {
  // Without a SharedWorker: one tab's stream for all (Web Locks), else a stream per tab.
  const channel = window.BroadcastChannel && navigator.locks
    ? new BroadcastChannel(STREAM_LOCK) : null;
  const kept = {}; // the holder's last "live", "inventory" and "warnings", for a new tab
  let lastId = ""; // the last event's id this tab saw: where a takeover resumes

  function told(kind, data, id) { // by this tab's own stream: here, and to every other tab
    if (kind !== "machine" && kind !== "missed") kept[kind] = data;
    if (id) lastId = id;
    deliver(kind, data);
    if (channel) channel.postMessage({kind, data, id});
  }
  function stream(takeover) {
    const resume = takeover && lastId ? `?last_event_id=${encodeURIComponent(lastId)}` : "";
    const source = new EventSource(`${API}/events/stream${resume}`);
    source.addEventListener("open", () => {
      told("live", true);
      // Taken over from a tab that closed before any event came: where to resume from is
      // not known, what came meanwhile was seen by nobody.
      if (takeover && !resume) told("missed", null);
      takeover = false;
    });
    source.addEventListener("error", () => told("live", false));
    for (const kind of KINDS) {
      source.addEventListener(kind, (msg) => told(kind, msg.data, msg.lastEventId));
    }
  }
  if (!channel) { stream(false); return; }
  let holder = false;
  channel.onmessage = ({data: msg}) => {
    if (msg.kind === "hello") {
      // What the holder knows, and where its stream is (a takeover by that tab resumes there).
      if (holder) {
        for (const [kind, data] of Object.entries(kept)) channel.postMessage({kind, data, id: lastId});
      }
    } else {
      if (msg.id) lastId = msg.id;
      deliver(msg.kind, msg.data);
    }
  };
  function hold(takeover) {
    holder = true;
    stream(takeover);
    return new Promise(() => {}); // held while this tab is open
  }
  navigator.locks.request(STREAM_LOCK, {ifAvailable: true}, (lock) => {
    if (lock) return hold(false);
    channel.postMessage({kind: "hello"}); // another tab holds it: it tells what it knows
    navigator.locks.request(STREAM_LOCK, () => hold(true)); // once that tab is gone
    return null;
  });
}

function shared(deliver) {
  // The stream of every tab in a SharedWorker (/ui/stream.js); false where the browser
  // refuses to start one, and the other ways if it fails to load.
  let worker;
  try {
    worker = new SharedWorker("/ui/stream.js", {name: STREAM_LOCK});
  } catch (err) {
    return false;
  }
  worker.addEventListener("error", () => elected(deliver));
  worker.port.onmessage = ({data: msg}) => deliver(msg.kind, msg.data);
  addEventListener("pagehide", () => worker.port.postMessage("bye"));
  addEventListener("pageshow", (e) => { if (e.persisted) worker.port.postMessage("hello"); });
  return true;
}

function discoveredBadge(total) {
  document.getElementById("discovered-count").textContent = total ? String(total) : "";
}

const refreshDiscovered = throttled(async () => {
  const {data} = await api("GET", "/machines?state=discovered&limit=1");
  discoveredBadge(data.total);
});

// ---- views -------------------------------------------------------------------------------

const query = {q: "", state: "", cluster: "", still: "", sort: "mac", order: "asc", offset: 0};
// Event kinds that move a machine along its install and change nothing of it but its state,
// time in state and events: no machine made, merged, renamed, moved to another cluster or
// given another NIC (enrolled, discovered, merged, updated, nic-attached, a report's own
// word: each of those reloads the page).
const PROGRESS = new Set(["dhcp", "install-plan", "config", "installing", "installed",
  "registered", "failed", "reinstall", "local-boot", "hold", "rendered"]);
// "Unchanged for" (GET /machines?unchanged_for=): with a state, the machines stuck in it
// during a storm (booting: script fetched, no config; installing; installed: not registered).
const STILL = [["", "changed any time"], ["300", "unchanged 5 min+"],
  ["900", "unchanged 15 min+"], ["3600", "unchanged 1 h+"], ["86400", "unchanged 1 day+"]];

function machinesView(root) {
  const counts = h("section", {class: "counts", "aria-label": "machines by state"});
  const clusterCounts = h("section", {class: "cluster-counts"});
  const search = h("input", {type: "search",
    placeholder: "search MAC, hostname, serial, id… or a label key=value",
    value: query.q, "aria-label": "search"});
  const stateSel = select("state", STATES, {empty: "any state", value: query.state});
  const clusterSel = h("select", {name: "cluster", "aria-label": "cluster"},
    h("option", {value: ""}, "any cluster"));
  const stillSel = h("select", {name: "still", "aria-label": "unchanged for"},
    STILL.map(([v, label]) => h("option", {value: v, selected: v === query.still}, label)));
  const tbody = h("tbody");
  const pager = h("div", {class: "pager"});
  const columns = [["macs", "MAC(s)", null], ["hostname", "Hostname", "hostname"],
    ["serial", "Serial", null], ["cluster", "Cluster", "cluster"], ["role", "Role", null],
    ["state", "State", "state"], ["last", "Last event", null], ["since", "Unchanged for", "state_since"]];
  const head = h("tr", {}, columns.map(([, label, key]) => {
    if (!key) return h("th", {}, label);
    const mark = query.sort === key ? (query.order === "asc" ? " ▲" : " ▼") : "";
    return h("th", {}, h("button", {class: "sort", onclick: () => {
      query.order = query.sort === key && query.order === "asc" ? "desc" : "asc";
      query.sort = key;
      query.offset = 0;
      route(); // rebuilds the header with the new sort mark
    }}, label + mark));
  }));
  root.append(
    h("h1", {}, "Machines"), counts, clusterCounts,
    h("div", {class: "filters"}, search, stateSel, clusterSel, stillSel),
    h("table", {class: "machines"}, h("thead", {}, head), tbody), pager);

  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { query.q = search.value.trim(); query.offset = 0; load(); }, 250);
  });
  stateSel.addEventListener("change", () => { query.state = stateSel.value; query.offset = 0; load(); });
  clusterSel.addEventListener("change", () => { query.cluster = clusterSel.value; query.offset = 0; load(); });
  stillSel.addEventListener("change", () => { query.still = stillSel.value; query.offset = 0; load(); });

  const changed = new Set(); // machines on the page named by events since the last load
  let shown = new Set(); // the ids of the page's rows
  let pageStale = false; // an event since the last load may have changed the page

  async function loadCounts() {
    const {data} = await api("GET", "/status");
    inventoryHealth(data.inventory);
    standingWarnings(data.warnings);
    discoveredBadge(data.by_state.discovered || 0);
    counts.replaceChildren(
      h("button", {class: `count${query.state === "" ? " active" : ""}`,
        onclick: () => { query.state = ""; stateSel.value = ""; query.offset = 0; load(); }},
      h("span", {class: "n"}, data.total), "all"),
      ...STATES.map((s) => h("button", {class: `count${query.state === s ? " active" : ""}`,
        dataset: {state: s}, onclick: () => {
          query.state = s; stateSel.value = s; query.offset = 0; load();
        }}, h("span", {class: "n"}, data.by_state[s] || 0), stateBadge(s))));
    const names = Object.keys(data.clusters);
    clusterCounts.replaceChildren(names.length ? h("table", {class: "small"},
      h("thead", {}, h("tr", {}, h("th", {}, "Cluster"), STATES.map((s) => h("th", {}, s)))),
      h("tbody", {}, names.map((n) => h("tr", {}, h("td", {}, n),
        STATES.map((s) => h("td", {class: "num"}, data.clusters[n][s] || "")))))) : "");
    const current = clusterSel.value || query.cluster;
    // Spread: replaceChildren takes nodes, and made an array one "[object …]" text node.
    clusterSel.replaceChildren(h("option", {value: ""}, "any cluster"),
      ...names.map((n) => h("option", {value: n, selected: n === current}, n)));
  }

  let asked = 0; // the newest page asked for: an older answer that comes later is dropped
  async function loadPage() {
    const mine = ++asked;
    const params = new URLSearchParams({limit: PAGE, offset: query.offset, sort: query.sort,
      order: query.order, last_event: "1"});
    for (const k of ["state", "cluster"]) if (query[k]) params.set(k, query[k]);
    // key=value is a label (GET /machines?label=, indexed); anything else a part of a MAC,
    // hostname, serial, UUID or id.
    if (/^[^=\s]+=\S*$/.test(query.q)) params.set("label", query.q);
    else if (query.q) params.set("q", query.q);
    if (query.still) params.set("unchanged_for", query.still);
    const {data} = await api("GET", `/machines?${params}`);
    // Two filters changed in a row ask two pages at once; the first (a bigger page, one
    // event read per row) can answer last and showed the filter no longer asked for.
    if (mine !== asked) return;
    shown = new Set(data.items.map((m) => m.id));
    tbody.replaceChildren(...data.items.map((m) => {
      const last = m.last_event;
      return h("tr", {dataset: {id: m.id},
        // A row an event just changed (or brought in) is highlighted for a moment.
        class: changed.has(m.id) ? "flash" : null,
        onclick: () => { location.hash = `#/machine/${encodeURIComponent(m.id)}`; }},
      h("td", {class: "mono"}, m.macs.length ? m.macs.join(" ") : "—"),
      h("td", {}, h("a", {href: `#/machine/${encodeURIComponent(m.id)}`}, m.hostname || m.id)),
      h("td", {}, m.serial || ""), h("td", {}, m.cluster || ""), h("td", {}, m.role || ""),
      h("td", {}, stateBadge(m.state)),
      h("td", {class: "event", title: last ? `${iso(last.time)} ${last.message}` : ""},
        last ? `${last.kind}: ${last.message}` : ""),
      h("td", {title: iso(m.state_since)}, age(m.state_since)));
    }));
    if (!data.items.length) {
      tbody.append(h("tr", {}, h("td", {colspan: columns.length, class: "muted"},
        "No machines match.")));
    }
    changed.clear();
    pager.replaceChildren(...pages(data.total));
  }

  // Previous and next only were 2,000 clicks to the end of 100,000 machines: the first and
  // the last page, and any page by its number (the server pages by offset: a page's first
  // row is (n - 1) × 50 of the order asked, however far; a search or a filter finds one
  // machine). Past the end (machines removed meanwhile), the last page that has rows.
  function pages(total) {
    const count = Math.max(1, Math.ceil(total / PAGE));
    const at = Math.floor(query.offset / PAGE) + 1;
    const go = (n) => {
      query.offset = (Math.min(Math.max(1, n), count) - 1) * PAGE;
      loadPage();
    };
    const last = Math.min(query.offset + PAGE, total);
    const number = h("input", {type: "number", min: 1, max: count, value: at,
      class: "page-number", "aria-label": "page", title: `page 1 to ${count}`});
    number.addEventListener("change", () => {
      const n = Number.parseInt(number.value, 10);
      if (Number.isFinite(n)) go(n); else number.value = at;
    });
    if (query.offset && query.offset >= total) go(count); // the page asked is gone
    return [
      h("button", {disabled: at <= 1, onclick: () => go(1)}, "« first"),
      h("button", {disabled: at <= 1, onclick: () => go(at - 1)}, "← previous"),
      h("label", {class: "page"}, "page ", number, ` of ${count}`),
      h("button", {disabled: at >= count, onclick: () => go(at + 1)}, "next →"),
      h("button", {disabled: at >= count, onclick: () => go(count)}, "last »"),
      h("span", {class: "range"},
        total ? `${query.offset + 1}–${last} of ${total}` : "0 machines"),
    ];
  }

  function load() {
    return Promise.all([loadCounts().catch(failed), loadPage().catch(failed)]);
  }
  // During a storm every event reloaded the page of 50 rows with their events (~5 ms of the
  // server's CPU each, ~1.4 a second per open tab) though it showed none of the machines
  // moving. An event moving a machine along its install (PROGRESS) neither brings a machine
  // onto the page nor takes one off, nor changes the total, while the page is sorted by MAC
  // or cluster and filtered by neither state, time in state nor text: then only an event
  // about a row shown reloads it. The counts above reload at every event.
  function pageMoves(ev) {
    if (query.state || query.still || query.q || !["mac", "cluster"].includes(query.sort)) {
      return true;
    }
    return !PROGRESS.has(ev.kind) || shown.has(ev.machine);
  }
  const reload = throttled(() => {
    const page = pageStale;
    pageStale = false;
    return Promise.all([loadCounts().catch(failed), page ? loadPage().catch(failed) : null]);
  });
  load();
  return {
    onEvent(ev) {
      if (!pageMoves(ev)) { reload(); return; }
      changed.add(ev.machine);
      pageStale = true;
      reload();
    },
    onMissed() { pageStale = true; reload(); },
    countsDiscovered: true,
  };
}

function machineView(root, id) {
  const actions = h("div", {class: "actions"});
  const info = h("dl", {class: "fields"});
  const timeline = h("ol", {class: "timeline"});
  const explain = h("pre", {class: "code"});
  const decision = h("p", {class: "decision"});
  const ipxe = h("pre", {class: "code"});
  const config = h("pre", {class: "code"});
  const title = h("h1", {}, id);
  root.append(h("p", {}, h("a", {href: "#/"}, "← machines")), title, actions,
    h("div", {class: "two"},
      h("section", {}, h("h2", {}, "Machine"), info),
      h("section", {}, h("h2", {}, "Events"), timeline)),
    h("section", {}, h("h2", {}, "What it will boot, and why"), decision, explain),
    h("div", {class: "two"},
      h("section", {}, h("h2", {}, "iPXE script"), ipxe),
      h("section", {}, h("h2", {}, "Config (secrets masked)"), config)));
  const ref = encodeURIComponent(id);

  async function act(label, method, path, body, after) {
    try {
      await api(method, path, body);
      notice(label);
      if (after) after(); else load();
    } catch (err) { failed(err); }
  }

  // Events name a machine by its id; the page may be opened by a MAC or a hostname (a link
  // pasted from a ticket, `#/machine/52:54:00:…`), which no event matched: it never followed.
  let known = id;
  async function load() {
    let m;
    try {
      m = (await api("GET", `/machines/${ref}`)).data;
    } catch (err) {
      if (err.status === 404) { title.textContent = `${id}: not found (removed?)`; return; }
      throw err;
    }
    known = m.id;
    title.replaceChildren(m.hostname || m.id, " ", stateBadge(m.state));
    const fields = [["id", m.id], ["MACs", m.macs.join(", ") || "—"], ["hostname", m.hostname],
      ["serial", m.serial], ["UUID", m.uuid], ["asset", m.asset], ["cluster", m.cluster],
      ["role", m.role], ["profile", m.profile], ["arch", m.arch], ["firmware", m.firmware],
      ["address", m.ipv4], ["labels", Object.entries(m.labels).map(([k, v]) => `${k}=${v}`).join(", ")],
      ["created", iso(m.created)], ["last changed", [age(m.updated, " ago"), ` (${iso(m.updated)})`]],
      ["in its state", [age(m.state_since), ` (since ${iso(m.state_since)})`]]];
    // Renamed after its installer fetched its config: its OS and k3s node keep the name it
    // installed with (its register command's node_name) until it installs again, as the
    // CLI's `machines set` and the API's PATCH answer say (s47-review, s48-review).
    const runs = m.facts && m.facts.node_name;
    if (RUNS_ITS_NAME.includes(m.state) && runs && runs !== m.hostname) {
      fields.splice(3, 0, ["runs as", h("span", {class: "runs-as"}, `${runs}: its installed ` +
        "OS and k3s node keep that name until it installs again (Reinstall)")]);
    }
    info.replaceChildren(...fields.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v || "—")]));
    const {clusters, profiles} = await choices();
    const buttons = [];
    if (m.state === "discovered") {
      const form = approveForm(m, clusters, profiles, () => load());
      buttons.push(form);
    } else {
      buttons.push(h("button", {onclick: () => act("reinstall requested", "POST",
        `/machines/${ref}/reinstall`)}, "Reinstall"));
    }
    if (MARKABLE.includes(m.state)) {
      // The CLI's `machines mark-installed` (the installer's report, made by an operator:
      // the API refuses it to a read or enroll scope): a machine whose disk holds its
      // install already (installed after the backup a restore brought back, or by other
      // means) boots that disk, not the installer that would wipe it.
      const name = m.hostname || m.id;
      buttons.push(h("button", {class: "mark-installed", onclick: () => {
        if (confirm(`Mark ${name} installed? Its next network boot goes to its local disk ` +
            "and nothing installs it again until a reinstall. Only for a machine whose disk " +
            "already holds its install.")) {
          act(`${name} marked installed`, "POST", `/machines/${ref}/events`,
            {kind: "installed", message: `marked installed by the operator from the ` +
              `dashboard (was ${m.state})`});
        }
      }}, "Mark installed"));
    }
    buttons.push(h("button", {class: "danger", onclick: () => {
      if (confirm(`Remove ${m.hostname || m.id} and its history from the inventory?`)) {
        act("removed", "DELETE", `/machines/${ref}`, undefined, () => { location.hash = "#/"; });
      }
    }}, "Remove"));
    actions.replaceChildren(...buttons);
    const events = (await api("GET", `/machines/${ref}/events?limit=200`)).data;
    timeline.replaceChildren(...events.slice().reverse().map((e) => h("li", {},
      h("time", {title: iso(e.time)}, age(e.time, " ago")), " ",
      h("strong", {}, e.kind), " ", e.message)));
    const why = (await api("GET", `/machines/${ref}/explain`)).data;
    // The profile its plan uses, for its problems (a file netboot refuses to serve).
    const used = why.profile ? (await api("GET", `/profiles/${encodeURIComponent(why.profile)}`,
      undefined, {allowError: true})).data : null;
    const problems = problemsBox(used && typeof used === "object" && used.name ? used : null,
      `Its profile ${why.profile} has problems: what it names below is refused when served ` +
      "(see Profiles):");
    decision.replaceChildren(h("strong", {}, why.decision || "—"), " — ", why.reason || "",
      why.group ? ` (group ${why.group}, profile from ${why.profile_source})` : "",
      ...(problems ? [problems] : []), ...await unseenArchitectures(m, ref));
    explain.textContent = JSON.stringify(why, null, 2);
    for (const [kind, el] of [["ipxe", ipxe], ["config", config]]) {
      const r = await api("GET", `/machines/${ref}/render/${kind}`, undefined, {allowError: true});
      el.textContent = typeof r.data === "string" ? r.data
        : `(nothing to show: ${r.data && r.data.error ? r.data.error : r.status})`;
    }
  }
  const reload = throttled(() => load().catch(failed));
  reload();
  return {
    onEvent(ev) { if (ev.machine === known) reload(); },
    onMissed: reload,
  };
}

// A machine enrolled and not booted yet: its architecture is not known, so a group that
// selects by arch (README's quickstart: x86 selects arch=x86_64) matches nothing yet, and the
// page said only "hold — no profile" of a machine that installs once it boots. What it boots
// as each architecture a fleet's boxes have (netboot explain REF --arch A).
const BOOT_ARCHES = ["x86_64", "arm64"];

async function unseenArchitectures(m, ref) {
  if (m.arch) return [];
  const answers = await Promise.all(BOOT_ARCHES.map((arch) =>
    api("GET", `/machines/${ref}/explain?arch=${arch}`)));
  return [h("ul", {class: "by-arch"},
    h("li", {}, "Not booted yet: its architecture is not known until its firmware asks. " +
      "Once it boots:"),
    BOOT_ARCHES.map((arch, i) => {
      const why = answers[i].data;
      // Its reason names the group that gives it the profile ("... (group x86)").
      return h("li", {dataset: {arch}}, `as an ${arch} box: `, h("strong", {}, why.decision),
        " — ", why.reason || "");
    }))];
}

function approveForm(m, clusters, profiles, done) {
  const form = h("form", {class: "approve", dataset: {id: m.id}},
    select("cluster", clusters, {empty: "cluster…", value: m.cluster || ""}),
    select("role", ["server", "agent"], {empty: "role…", value: m.role || ""}),
    select("profile", profiles, {empty: "profile…", value: m.profile || ""}),
    h("input", {name: "hostname", placeholder: "hostname (optional)", "aria-label": "hostname"}),
    h("button", {type: "submit"}, "Approve"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {};
    for (const [k, v] of new FormData(form).entries()) if (v) body[k] = v;
    try {
      const ref = encodeURIComponent(m.id);
      const approved = (await api("POST", `/machines/${ref}/approve`, body)).data;
      // Where it goes and what its next boot does, as `netboot machines approve` says it
      // (a group may give the cluster and role the form left empty, or hold it): "approved"
      // alone said nothing of either (s48-review).
      let next = "";
      try {
        const why = (await api("GET", `/machines/${ref}/explain`)).data;
        next = `: ${why.cluster ? `cluster ${why.cluster} as ${why.role || "agent"}` :
          "no cluster"}; its next network boot: ${why.decision} (${why.reason})`;
      } catch (err) { /* a token that may enroll but not read: the approval alone */ }
      notice(`${m.macs[0] || m.id} approved as ${approved.hostname || m.id}${next}`);
      done();
    } catch (err) { failed(err); }
  });
  return form;
}

function discoveredView(root) {
  const tbody = h("tbody");
  const total = h("p", {class: "muted"});
  root.append(h("h1", {}, "Discovered machines"),
    h("p", {class: "muted"}, "Machines that booted and nobody enrolled: approve each with a " +
      "cluster, a role and a profile (or leave them to the groups and defaults)."),
    total,
    h("table", {class: "machines"}, h("thead", {}, h("tr", {},
      ["MAC(s)", "Arch", "Firmware", "Serial", "First seen", "Approve as"].map((t) => h("th", {}, t)))),
    tbody));
  async function load() {
    const [{data}, {clusters, profiles}] = await Promise.all([
      api("GET", `/machines?state=discovered&limit=${PAGE}&sort=created&order=desc`), choices()]);
    total.textContent = data.total > data.items.length
      ? `the ${data.items.length} newest of ${data.total}` : `${data.total} waiting`;
    tbody.replaceChildren(...data.items.map((m) => h("tr", {dataset: {id: m.id}},
      h("td", {class: "mono"}, h("a", {href: `#/machine/${encodeURIComponent(m.id)}`},
        m.macs.join(" ") || m.id)),
      h("td", {}, m.arch || ""), h("td", {}, m.firmware || ""), h("td", {}, m.serial || ""),
      h("td", {title: iso(m.created)}, age(m.created, " ago")),
      h("td", {}, approveForm(m, clusters, profiles, reload)))));
    if (!data.items.length) {
      tbody.append(h("tr", {}, h("td", {colspan: 6, class: "muted"},
        "No machine is waiting for approval.")));
    }
  }
  const reload = throttled(() => load().catch(failed));
  reload();
  return {onEvent: reload, onMissed: reload};
}

function enrollView(root) {
  const one = h("form", {class: "enroll"},
    h("label", {}, "MAC(s) ", h("input", {name: "macs", placeholder: "52:54:00:12:34:56, …"})),
    h("label", {}, "Hostname ", h("input", {name: "hostname"})),
    h("label", {}, "Serial ", h("input", {name: "serial"})),
    h("label", {}, "Cluster ", h("select", {name: "cluster"})),
    h("label", {}, "Role ", select("role", ["server", "agent"])),
    h("label", {}, "Profile ", h("select", {name: "profile"})),
    h("button", {type: "submit"}, "Enroll"));
  choices().then(({clusters, profiles}) => {
    one.elements.cluster.replaceWith(select("cluster", clusters));
    one.elements.profile.replaceWith(select("profile", profiles));
  }).catch(failed);
  one.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {};
    for (const [k, v] of new FormData(one).entries()) {
      if (!v) continue;
      body[k] = k === "macs" ? v.split(/[\s,]+/).filter(Boolean) : v;
    }
    try {
      const {data} = await api("POST", "/machines", body);
      notice(`enrolled ${data.hostname || data.id}`);
      one.reset();
    } catch (err) { failed(err); }
  });

  const file = h("input", {type: "file", name: "file", accept: ".csv,.yaml,.yml,.json",
    "aria-label": "import file"});
  const check = h("button", {type: "button"}, "Check (dry run)");
  const apply = h("button", {type: "button", disabled: true}, "Import");
  const report = h("div", {class: "report"});
  let text = null;
  let format = null;

  function formatOf(name) {
    const ext = name.split(".").pop().toLowerCase();
    return ext === "yml" ? "yaml" : ["csv", "yaml", "json"].includes(ext) ? ext : "csv";
  }

  async function send(dryRun) {
    const {status, data} = await api("POST",
      `/machines:import?format=${format}&dry_run=${dryRun ? 1 : 0}`, undefined,
      {raw: text, contentType: "text/plain; charset=utf-8", allowError: true});
    if (!data || !Array.isArray(data.errors)) {
      // The file itself is unreadable (not CSV/YAML/JSON): one error for the whole file.
      const msg = data && data.error ? `${data.field ? data.field + ": " : ""}${data.error}` : `HTTP ${status}`;
      report.replaceChildren(h("p", {class: "error"}, msg));
      apply.disabled = true;
      return;
    }
    const rows = data.errors.map((e) => h("tr", {class: "row-error"},
      h("td", {class: "num"}, e.line), h("td", {}, e.field), h("td", {}, e.message)));
    const summary = `${data.created.length} new, ${data.changed.length} changed, ` +
      `${data.unchanged.length} unchanged, ${data.errors.length} with errors` +
      (data.applied ? " — imported" : dryRun ? " — nothing changed yet" : "");
    report.replaceChildren(h("p", {class: data.errors.length ? "error" : "ok"}, summary),
      rows.length ? h("table", {class: "errors"}, h("thead", {}, h("tr", {},
        h("th", {}, "Line"), h("th", {}, "Field"), h("th", {}, "Problem"))), h("tbody", {}, rows)) : "");
    apply.disabled = !dryRun || data.errors.length > 0;
    if (data.applied) { lists = null; notice("import applied"); }
  }

  check.addEventListener("click", async () => {
    const f = file.files[0];
    if (!f) { notice("choose a file first", "error"); return; }
    text = await f.text();
    format = formatOf(f.name);
    send(true).catch(failed);
  });
  apply.addEventListener("click", () => send(false).catch(failed));
  file.addEventListener("change", () => { apply.disabled = true; report.replaceChildren(); });

  root.append(h("h1", {}, "Enroll"),
    h("section", {}, h("h2", {}, "One machine"), one),
    h("section", {}, h("h2", {}, "Bulk import"),
      h("p", {class: "muted"}, "CSV (header row with mac, hostname, serial, cluster, role, " +
        "profile, label.KEY …), YAML or JSON. Every row is checked first; nothing changes " +
        "until the file is clean and you press Import."),
      h("div", {class: "filters"}, file, check, apply), report));
  return {};
}

function clustersView(root) {
  // A page of each cluster's nodes, and how many it has (GET /status): a cluster of 12,500
  // nodes was fetched whole, ~8 MiB of JSON, again at every reload during a storm.
  const list = h("div");
  root.append(h("h1", {}, "Clusters"), list);
  async function load() {
    const [{data}, {data: status}] = await Promise.all([api("GET", "/clusters"),
      api("GET", "/status")]);
    if (!data.length) { list.replaceChildren(h("p", {class: "muted"}, "No clusters yet.")); return; }
    const sections = await Promise.all(data.map(async (c) => {
      const nodes = (await api("GET",
        `/clusters/${encodeURIComponent(c.name)}/nodes?limit=${PAGE}`)).data;
      const total = Object.values(status.clusters[c.name] || {}).reduce((a, b) => a + b, 0);
      const first = nodes.find((n) => n.role === "server" && n.state === "registered" && n.ipv4);
      const registered = (status.clusters[c.name] || {}).registered || 0;
      const endpoint = c.server_url !== "managed" ? c.server_url
        : c.endpoint || (first ? `${first.ipv4} (first registered server)`
          : registered && nodes.length < total ? "the first registered server's address"
            : "none yet: waiting for a server to register");
      const all = () => {
        Object.assign(query, {q: "", state: "", still: "", cluster: c.name, offset: 0});
        if (location.hash === "#/") route(); else location.hash = "#/";
      };
      return h("section", {class: "cluster", dataset: {cluster: c.name}},
        h("h2", {}, c.name),
        h("dl", {class: "fields"}, h("dt", {}, "k3s"), h("dd", {}, c.server_url),
          h("dt", {}, "endpoint"), h("dd", {}, endpoint),
          c.description ? [h("dt", {}, "description"), h("dd", {}, c.description)] : null),
        problemsBox(c, "What this cluster's k3s tokens let others do:", "cluster"),
        h("table", {class: "machines"}, h("thead", {}, h("tr", {},
          ["Hostname", "MAC(s)", "Role", "State", "Address"].map((t) => h("th", {}, t)))),
        h("tbody", {}, nodes.map((n) => h("tr", {onclick: () => {
          location.hash = `#/machine/${encodeURIComponent(n.id)}`;
        }}, h("td", {}, n.hostname || n.id), h("td", {class: "mono"}, n.macs.join(" ")),
        h("td", {}, n.role || ""), h("td", {}, stateBadge(n.state)), h("td", {}, n.ipv4 || ""))))),
        total > nodes.length ? h("p", {class: "more"}, `the first ${nodes.length} of ${total} — `,
          h("a", {href: "#/", onclick: (e) => { e.preventDefault(); all(); }},
            "all of them in the machines list")) : null);
    }));
    list.replaceChildren(...sections);
  }
  const reload = throttled(() => load().catch(failed));
  reload();
  return {onEvent: reload, onMissed: reload};
}

function problemsBox(profile, intro, kind = "profile") {
  // A profile's problems (GET /profiles: a file it names that netboot refuses to serve, a
  // profile stored before the checks), or a cluster's (GET /clusters: its short k3s token):
  // each field and why, where an operator looks.
  if (!profile || !profile.problems || !profile.problems.length) return null;
  return h("div", {class: "problems", dataset: {[kind]: profile.name}},
    h("strong", {}, intro),
    h("ul", {}, profile.problems.map((p) => h("li", {},
      h("span", {class: "mono"}, p.field), ": ", p.error))));
}

function profilesView(root) {
  const list = h("div");
  root.append(h("h1", {}, "Profiles"), list);
  async function load() {
    const {data} = await api("GET", "/profiles");
    if (!data.length) { list.replaceChildren(h("p", {class: "muted"}, "No profiles yet.")); return; }
    list.replaceChildren(...data.map((p) => h("section", {class: "profile", dataset: {profile: p.name}},
      h("h2", {}, p.name, p.problems && p.problems.length
        ? h("span", {class: "badge badge-bad"}, `${p.problems.length} problem` +
          (p.problems.length > 1 ? "s" : "")) : null),
      problemsBox(p, "Boots with this profile are refused when served, until it is fixed " +
        "(PUT /api/v1/profiles/" + p.name + "):"),
      h("dl", {class: "fields"}, [["kernel", p.kernel], ["initrds", (p.initrds || []).join(", ")],
        ["command line", p.cmdline], ["config template", p.config_template],
        ["install timeout", p.install_timeout ? `${p.install_timeout} s` : ""],
        ["description", p.description]].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v || "—")])))));
  }
  const reload = throttled(() => load().catch(failed));
  reload();
  // Machine events change no profile; a stream that missed some reloads all the same.
  return {onEvent() {}, onMissed: reload};
}

// ---- router ------------------------------------------------------------------------------

function route() {
  const root = document.getElementById("view");
  root.replaceChildren();
  const hash = location.hash.replace(/^#/, "") || "/";
  const [, page, arg] = hash.split("/");
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.nav === (page || "machines") ||
      (page === "machine" && a.dataset.nav === "machines"));
  }
  if (page === "machine" && arg) view = machineView(root, decodeURIComponent(arg));
  else if (page === "discovered") view = discoveredView(root);
  else if (page === "enroll") view = enrollView(root);
  else if (page === "clusters") view = clustersView(root);
  else if (page === "profiles") view = profilesView(root);
  else view = machinesView(root);
}

window.addEventListener("hashchange", route);
route();
connect(); // its "inventory" event shows the banner (no GET /status a tab every 15 s)
loggedOutTogether();

// Logged out in one tab, every tab of the browser goes to the login page. The session is an
// API token (logout deletes the cookie, it revokes nothing), and the stream the tabs share
// (the SharedWorker's, or the elected tab's) was opened with it: the other tabs kept the
// fleet's events coming, live, for as long as one of them stayed open (s48-attack). Its
// form is sent by fetch, so that the cookie is gone before the others leave.
function loggedOutTogether() {
  const form = document.querySelector("form.logout");
  if (!form || !window.BroadcastChannel) return;
  const channel = new BroadcastChannel("netboot-session");
  channel.onmessage = ({data}) => { if (data === "logout") location.href = "/login"; };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await fetch("/logout", {method: "POST", redirect: "manual"});
    } catch (err) {
      form.submit(); // not sent: as a plain form, which goes to the login page itself
      return;
    }
    channel.postMessage("logout");
    location.href = "/login";
  });
}
refreshDiscovered();
