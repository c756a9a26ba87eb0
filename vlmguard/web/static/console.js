// vlmguard console: plain JavaScript, no build step. hls.js (vendored, 1.7.4 light build)
// plays the live cameras; one EventSource (/api/events) keeps the page current.
"use strict";

const SEVERITIES = ["low", "medium", "high", "critical"];
const PAGE = 20;
// Low-Latency HLS: hls.js keeps PART-HOLD-BACK behind the live edge (under a second) and
// plays up to 1.5x to get back there after a stall. A camera served without parts keeps
// PLAIN_HLS_LATENCY (set once its playlist is known). Plus our own jumps back to the live
// edge (visible again, after a stall): hls.js alone resumes where it stopped.
const HLS_CONFIG = {startPosition: -1, lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.5,
                    maxBufferLength: 10, backBufferLength: 10, enableWorker: true};
// Past this many target durations behind, hls.js seeks back to the live edge. Set after
// construction: given in the config, hls.js demands a liveSyncDurationCount with it,
// which would replace the playlist's PART-HOLD-BACK as the latency aimed at.
const MAX_LATENCY_TARGETS = 7;
const PLAIN_HLS_LATENCY = 3;
const STALL_JUMP_MS = 2000;
const LATENCY_MS = 1000;

const state = {
  csrf: null, cameras: [], latest: {}, players: [], view: null, events: null,
  page: 0, total: 0, filters: {}, statusTimer: null, dialogIncident: null,
};
window.vlmguardConsole = state;  // read by the browser tests and by curious people

const $ = (selector) => document.querySelector(selector);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// -- talking to the server -------------------------------------------------------------

async function api(path, options = {}) {
  const init = {credentials: "same-origin", headers: {}, ...options};
  if (init.method === "POST") {
    init.headers["X-CSRF-Token"] = state.csrf || "";
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    showSignIn();
    throw new Error("signed out");
  }
  const body = response.headers.get("Content-Type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(body?.error || `HTTP ${response.status}`);
  return body;
}

const post = (path, body) => api(path, {method: "POST", body: JSON.stringify(body || {})});

// -- sign-in ---------------------------------------------------------------------------

async function start() {
  const session = await (await fetch("/api/session", {credentials: "same-origin"})).json();
  if (!session.signed_in) return showSignIn();
  state.csrf = session.csrf;
  $("#sign-out").hidden = !session.token_required;
  await boot();
}

function showSignIn() {
  stopEverything();
  showView("signin");
  $("#token").focus();
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#signin-error").textContent = "";
  const response = await fetch("/api/session", {
    method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: $("#token").value})});
  if (!response.ok) {
    $("#signin-error").textContent = response.status === 401 ? "Wrong token."
      : response.status === 429 ? `Too many wrong tokens: try again in ${response.headers.get("Retry-After")} s.`
      : `Sign-in failed (HTTP ${response.status}).`;
    return;
  }
  $("#token").value = "";
  await start();
});

$("#sign-out").addEventListener("click", async () => {
  await post("/api/session/end");
  location.hash = "#/live";
  showSignIn();
});

async function boot() {
  state.cameras = (await api("/api/cameras")).cameras;
  fillFilterChoices();
  connectEvents();
  await loadLatest();
  window.addEventListener("hashchange", route);
  await route();
}

function stopEverything() {
  destroyPlayers();
  if (state.events) state.events.close();
  state.events = null;
  clearInterval(state.statusTimer);
  window.removeEventListener("hashchange", route);
}

// -- views -----------------------------------------------------------------------------

function showView(name) {
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== `view-${name}`;
  }
  for (const link of document.querySelectorAll("header nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  state.view = name;
}

async function route() {
  const [, view = "live", arg] = location.hash.split("/");
  clearInterval(state.statusTimer);
  if (view !== "live") destroyPlayers();
  if (view !== "recordings") window.vlmguardRecordings?.hide();
  if (view === "incidents") {
    showView("incidents");
    await loadIncidents();
  } else if (view === "recordings") {
    showView("recordings");
    await window.vlmguardRecordings.show();
  } else if (view === "system") {
    showView("system");
    await loadStatus();
    state.statusTimer = setInterval(loadStatus, 5000);
  } else {
    showView("live");
    renderLive(arg ? decodeURIComponent(arg) : null);
  }
}

// -- live ------------------------------------------------------------------------------

function renderLive(only) {
  destroyPlayers();
  const grid = $("#grid");
  grid.replaceChildren();
  grid.classList.toggle("single", Boolean(only));
  $("#live-back").hidden = !only;
  // Another box's cameras play through this box's server too (/live/ passes them on).
  const cameras = only ? state.cameras.filter((c) => c.id === only) : state.cameras;
  for (const camera of cameras) {
    const video = el("video", {muted: true, playsinline: true, autoplay: true,
                               "aria-label": `Live video of ${camera.id}`});
    video.muted = true;
    const tile = el("article", {class: "tile", "data-camera": camera.id, tabindex: only ? null : "0",
                                role: only ? null : "link",
                                "aria-label": only ? null : `Open ${camera.id} large`},
      video,
      el("div", {class: "caption"},
        el("div", {class: "name"}, el("span", {}, cameraName(camera.id)),
           el("span", {},
              el("span", {class: "latency muted",
                          title: "How far behind the camera the picture shown is"}),
              " ", el("span", {class: "online"}))),
        el("div", {class: "score muted"}),
        el("div", {class: "latest"})));
    if (!only) {
      const open = () => { location.hash = `#/live/${encodeURIComponent(camera.id)}`; };
      tile.addEventListener("click", open);
      tile.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    }
    grid.append(tile);
    updateTile(camera.id);
    state.players.push(makePlayer(camera.id, video));
  }
}

function updateTile(cameraId) {
  const tile = document.querySelector(`.tile[data-camera="${CSS.escape(cameraId)}"]`);
  if (!tile) return;
  const camera = state.cameras.find((c) => c.id === cameraId) || {};
  const online = tile.querySelector(".online");
  online.textContent = camera.online ? "live" : camera.node && !camera.node_alive ? "box down" : "offline";
  online.className = `online ${camera.online ? "state-online" : "state-offline"}`;
  const latest = state.latest[cameraId] || {};
  tile.querySelector(".score").textContent = latest.score === undefined || latest.score === null
    ? "No safety score yet" : `Safety score ${latest.score} / 100`;
  const box = tile.querySelector(".latest");
  box.replaceChildren();
  if (latest.incident) {
    box.append(severityBadge(latest.incident.severity), " ", latest.incident.category, " · ",
               timeText(latest.incident.start_at));
  } else box.append(el("span", {class: "muted"}, "No incident"));
}

async function loadLatest() {
  // Latest score from the last completed job; latest incident per camera.
  await Promise.all(state.cameras.map(async (camera) => {
    const id = encodeURIComponent(camera.id);
    const [jobs, found] = await Promise.all([
      api(`/api/jobs?camera=${id}&state=completed&limit=1`),
      api(`/api/incidents?camera=${id}&limit=1`)]);
    state.latest[camera.id] = {score: jobs.jobs[0]?.safety_score, incident: found.incidents[0]};
    updateTile(camera.id);
  }));
}

function makePlayer(cameraId, video) {
  const url = `/live/${encodeURIComponent(cameraId)}/index.m3u8`;
  const player = {cameraId, video, hls: null, stallTimer: null, jumpOnUpdate: false,
                  latencyTimer: null};
  if (!window.Hls || !Hls.isSupported()) {
    // Safari and iOS play HLS themselves; they keep to the live edge on their own.
    video.src = url;
    return player;
  }
  const hls = new Hls(HLS_CONFIG);
  hls.config.liveMaxLatencyDurationCount = MAX_LATENCY_TARGETS;
  player.hls = hls;
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play().catch(() => {}));
  hls.once(Hls.Events.LEVEL_LOADED, (_event, data) => {
    if (!data.details.partList) hls.targetLatency = PLAIN_HLS_LATENCY;
  });
  hls.on(Hls.Events.LEVEL_UPDATED, () => {
    if (player.jumpOnUpdate) {
      player.jumpOnUpdate = false;
      jumpToLive(player);
    }
  });
  hls.on(Hls.Events.ERROR, (_event, data) => {
    if (data.details === Hls.ErrorDetails.BUFFER_STALLED_ERROR) jumpToLive(player);
    if (!data.fatal) return;
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR) hls.recoverMediaError();
    else setTimeout(() => { if (player.hls) { hls.startLoad(-1); player.jumpOnUpdate = true; } }, 2000);
  });
  video.addEventListener("waiting", () => {
    clearTimeout(player.stallTimer);
    player.stallTimer = setTimeout(() => jumpToLive(player), STALL_JUMP_MS);
  });
  video.addEventListener("playing", () => clearTimeout(player.stallTimer));
  hls.loadSource(url);
  hls.attachMedia(video);
  player.latencyTimer = setInterval(() => showLatency(player), LATENCY_MS);
  return player;
}

// The delay measured on the picture itself: now minus the wall-clock time the server
// stamped on the frame being shown (EXT-X-PROGRAM-DATE-TIME, taken as the frames arrive).
function showLatency(player) {
  const label = player.video.closest(".tile")?.querySelector(".latency");
  if (!label || !player.hls) return;
  const shown = player.hls.playingDate;
  const seconds = shown ? (Date.now() - shown.getTime()) / 1000 : null;
  const details = player.hls.latestLevelDetails;
  label.textContent = seconds === null || player.video.paused ? ""
    : `${details?.partTarget ? "LL " : ""}${seconds.toFixed(1)} s`;
  player.latency = seconds;
}

function jumpToLive(player) {
  const {hls, video} = player;
  if (!hls) return;
  const target = hls.liveSyncPosition;
  if (target !== null && target !== undefined && Number.isFinite(target) &&
      Math.abs(video.currentTime - target) > 1) {
    video.currentTime = target;
  }
  video.play().catch(() => {});
}

function destroyPlayers() {
  for (const player of state.players) {
    clearTimeout(player.stallTimer);
    clearInterval(player.latencyTimer);
    if (player.hls) player.hls.destroy();
    player.hls = null;
    player.video.removeAttribute("src");
    player.video.load();
  }
  state.players = [];
}

// A hidden tab stops fetching video (the box's bandwidth and CPU); shown again, each
// player reloads its playlist and jumps to the live edge instead of resuming minutes back.
document.addEventListener("visibilitychange", () => {
  for (const player of state.players) {
    if (!player.hls) continue;
    if (document.visibilityState === "hidden") {
      player.hls.stopLoad();
      player.video.pause();
    } else {
      player.jumpOnUpdate = true;
      player.hls.startLoad(-1);
      jumpToLive(player);
    }
  }
});
window.addEventListener("online", () => state.players.forEach((p) => { p.jumpOnUpdate = true; p.hls?.startLoad(-1); }));

// -- incidents -------------------------------------------------------------------------

// A camera of another box carries that box's name, so a site-wide list says where it is.
function cameraName(cameraId, node) {
  const where = node ?? state.cameras.find((c) => c.id === cameraId)?.node;
  return where ? `${cameraId} (${where})` : cameraId;
}

function severityBadge(severity) {
  return el("span", {class: `sev sev-${severity}`}, (severity || "?").toUpperCase());
}

function timeText(iso) {
  return iso ? new Date(iso).toLocaleString([], {dateStyle: "short", timeStyle: "medium"}) : "";
}

function fillFilterChoices() {
  const cameraSelect = $("#filters [name=camera]");
  cameraSelect.replaceChildren(el("option", {value: ""}, "All"),
    ...state.cameras.map((c) => el("option", {value: c.id}, cameraName(c.id))));
  const today = new Date();
  const day = `${today.getFullYear()}-${String(today.getMonth() + 1).padStart(2, "0")}-${String(today.getDate()).padStart(2, "0")}`;
  $("#filters [name=from]").value = day;
  readFilters();
}

async function fillCategories() {
  const select = $("#filters [name=category]");
  const chosen = select.value;
  const {categories} = await api("/api/incident-categories");
  select.replaceChildren(el("option", {value: ""}, "All"),
    ...categories.map((c) => el("option", {value: c}, c)));
  select.value = chosen;
}

function readFilters() {
  const form = new FormData($("#filters"));
  state.filters = Object.fromEntries(form.entries());
}

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  readFilters();
  state.page = 0;
  loadIncidents();
});
$("#prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); loadIncidents(); });
$("#next").addEventListener("click", () => { state.page += 1; loadIncidents(); });

function localDayStart(dateText) {
  const [y, m, d] = dateText.split("-").map(Number);
  return new Date(y, m - 1, d);
}

function query(extra = {}) {
  const f = state.filters;
  const params = new URLSearchParams();
  if (f.camera) params.set("camera", f.camera);
  if (f.severity) params.set("severity", f.severity);
  if (f.category) params.set("category", f.category);
  if (f.from) params.set("since", localDayStart(f.from).toISOString());
  if (f.to) params.set("until", new Date(localDayStart(f.to).getTime() + 86400000).toISOString());
  for (const [key, value] of Object.entries(extra)) params.set(key, value);
  return params.toString();
}

function matchesFilters(incident) {
  const f = state.filters;
  if (f.camera && incident.camera_id !== f.camera) return false;
  if (f.category && incident.category !== f.category) return false;
  if (f.severity && SEVERITIES.indexOf(incident.severity) < SEVERITIES.indexOf(f.severity)) return false;
  const start = new Date(incident.start_at).getTime();
  if (f.from && start < localDayStart(f.from).getTime()) return false;
  if (f.to && start >= localDayStart(f.to).getTime() + 86400000) return false;
  return true;
}

async function loadIncidents() {
  fillCategories().catch(() => {});
  const found = await api(`/api/incidents?${query({limit: PAGE, offset: state.page * PAGE})}`);
  state.total = found.total;
  const list = $("#incident-list");
  list.replaceChildren(...found.incidents.map(incidentItem));
  showCount();
  $("#prev").disabled = state.page === 0;
  $("#next").disabled = (state.page + 1) * PAGE >= state.total;
  await loadTimeline();
}

function showCount() {
  const first = state.total ? state.page * PAGE + 1 : 0;
  const last = Math.min(state.total, (state.page + 1) * PAGE);
  $("#incident-count").textContent = state.total
    ? `${first}-${last} of ${state.total} incidents` : "No incidents match.";
}

function incidentItem(incident) {
  const thumb = el("img", {src: `/api/incidents/${incident.id}/snapshot.jpg`, alt: "", loading: "lazy",
                           width: 128, height: 72});
  thumb.addEventListener("error", () => { thumb.style.visibility = "hidden"; }, {once: true});
  const button = el("button", {type: "button", class: "incident", "data-incident": incident.id,
                               "aria-label": `${incident.severity} ${incident.category} on ${incident.camera_id} at ${timeText(incident.start_at)}: play clip`},
    thumb,
    el("span", {class: "what"},
      el("span", {}, severityBadge(incident.severity), " ", el("strong", {}, incident.category),
         " · ", cameraName(incident.camera_id, incident.node)),
      el("span", {class: "muted"}, timeText(incident.start_at)),
      el("span", {}, incident.description),
      el("span", {class: "acked"}, ackText(incident), incident.kept_at ? " · archive kept" : "")));
  button.addEventListener("click", () => openIncident(incident.id));
  return el("li", {}, button);
}

function ackText(incident) {
  if (!incident.acknowledged_at) return "Not acknowledged";
  return `Acknowledged ${timeText(incident.acknowledged_at)}${incident.ack_note ? ` — “${incident.ack_note}”` : ""}`;
}

async function loadTimeline() {
  const day = state.filters.from || state.filters.to;
  const box = $("#timeline");
  if (!day) {
    box.replaceChildren(el("p", {class: "muted"}, "Choose a From date to see that day's timeline."));
    return;
  }
  const dayStart = localDayStart(day);
  const params = new URLSearchParams(query({limit: 500}));
  params.set("since", dayStart.toISOString());
  params.set("until", new Date(dayStart.getTime() + 86400000).toISOString());
  const {incidents} = await api(`/api/incidents?${params}`);
  $("#timeline-title").textContent = `Day timeline, ${dayStart.toLocaleDateString()}`;
  const cameras = state.filters.camera ? [state.filters.camera] : state.cameras.map((c) => c.id);
  box.replaceChildren(...cameras.map((cameraId) => timelineTrack(cameraId, dayStart,
    incidents.filter((i) => i.camera_id === cameraId))));
}

function timelineTrack(cameraId, dayStart, incidents) {
  const bar = el("div", {class: "bar", role: "group", "aria-label": `${cameraId}: ${incidents.length} incidents`});
  for (const incident of incidents) {
    const at = (new Date(incident.start_at) - dayStart) / 86400000;
    const mark = el("button", {type: "button", class: `mark sev sev-${incident.severity}`,
                               title: `${incident.severity} ${incident.category} ${timeText(incident.start_at)}`,
                               "aria-label": `${incident.severity} ${incident.category} at ${timeText(incident.start_at)}`},
                    incident.severity[0].toUpperCase());
    mark.style.left = `${(at * 100).toFixed(3)}%`;
    mark.addEventListener("click", () => openIncident(incident.id));
    bar.append(mark);
  }
  const hours = el("div", {class: "hours", "aria-hidden": "true"});
  for (const h of [0, 6, 12, 18, 24]) {
    const label = el("span", {}, `${String(h).padStart(2, "0")}:00`);
    label.style.left = `${h / 24 * 100}%`;
    hours.append(label);
  }
  return el("div", {class: "track"}, el("span", {}, cameraName(cameraId)), el("div", {}, bar, hours));
}

// -- one incident: its clip, acknowledge, keep ------------------------------------------

async function openIncident(id) {
  const incident = await api(`/api/incidents/${id}`);
  state.dialogIncident = incident;
  $("#dialog-title").replaceChildren(severityBadge(incident.severity), " ", incident.category,
                                     " on ", cameraName(incident.camera_id, incident.node));
  $("#dialog-meta").textContent = `${timeText(incident.start_at)} to ${timeText(incident.end_at)}`;
  $("#dialog-description").textContent = incident.description;
  // Recordings are browsed on the box that made them: another box's open in its own console.
  const recordings = $("#dialog-recordings");
  recordings.href = `${incident.console_url || ""}#/recordings/${encodeURIComponent(incident.camera_id)}/${encodeURIComponent(incident.start_at)}`;
  recordings.target = incident.console_url ? "_blank" : "";
  recordings.rel = incident.console_url ? "noopener" : "";
  $("#ack-note").value = incident.ack_note || "";
  $("#ack-state").textContent = ackText(incident);
  showKeep(incident);
  $("#incident-dialog").showModal();
  await playClip(incident);
}

// The clip is cut on request; its time 0 is the wall-clock time in X-Clip-Start. It is
// fetched whole (a few seconds of video) so that header can be read, then played from
// memory at the incident's own start.
async function playClip(incident) {
  const video = $("#clip");
  $("#clip-error").textContent = "Loading clip…";
  let response;
  try {
    response = await fetch(`/api/incidents/${incident.id}/clip.mp4`, {credentials: "same-origin"});
  } catch (error) {
    response = null;
  }
  if (!response || !response.ok) {
    const why = response ? (await response.json().catch(() => ({}))).error || `HTTP ${response.status}` : "network error";
    $("#clip-error").textContent = `This clip cannot be played: ${why}.`;
    return;
  }
  const clipStart = new Date(response.headers.get("X-Clip-Start") || incident.start_at);
  const blob = await response.blob();
  if (state.dialogIncident !== incident) return;  // closed or replaced meanwhile
  $("#clip-error").textContent = "";
  if (video.src.startsWith("blob:")) URL.revokeObjectURL(video.src);
  video.onloadedmetadata = () => {
    video.currentTime = Math.max(0, (new Date(incident.start_at) - clipStart) / 1000);
    video.play().catch(() => {});
  };
  video.src = URL.createObjectURL(blob);
}

function showKeep(incident) {
  $("#keep-button").textContent = incident.kept_at ? "Release archive" : "Keep archive";
  $("#keep-state").textContent = incident.kept_at
    ? `Archive kept since ${timeText(incident.kept_at)}: retention will not delete it.`
    : "Archive follows retention.";
}

$("#incident-dialog").addEventListener("close", () => {
  const video = $("#clip");
  video.pause();
  if (video.src.startsWith("blob:")) URL.revokeObjectURL(video.src);
  video.removeAttribute("src");
  video.load();
  state.dialogIncident = null;
});

$("#dialog-recordings").addEventListener("click", () => $("#incident-dialog").close());

$("#ack-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const incident = state.dialogIncident;
  try {
    const done = await post(`/api/incidents/${incident.id}/acknowledge`, {note: $("#ack-note").value});
    Object.assign(incident, done);
    $("#ack-state").textContent = ackText(incident);
    refreshListItem(incident);
  } catch (error) {
    $("#ack-state").textContent = `Not acknowledged: ${error.message}`;
  }
});

$("#keep-button").addEventListener("click", async () => {
  const incident = state.dialogIncident;
  try {
    const done = await post(`/api/jobs/${incident.job_id}/keep`, {keep: !incident.kept_at});
    incident.kept_at = done.kept ? new Date().toISOString() : null;
    showKeep(incident);
    if (state.view === "incidents") loadIncidents();
  } catch (error) {
    $("#keep-state").textContent = `Not changed: ${error.message}`;
  }
});

function refreshListItem(incident) {
  const button = document.querySelector(`[data-incident="${incident.id}"] .acked`);
  if (button) button.textContent = ackText(incident) + (incident.kept_at ? " · archive kept" : "");
}

// -- queue and system ------------------------------------------------------------------

// Per provider: paused (misconfigured, quota...) or answering, and today's cost with input
// and output priced apart (output includes thinking).
function providerTable(report) {
  const paused = Object.fromEntries(report.analysis.paused.map((p) => [p.provider, p]));
  const cost = report.cost_today || {};
  const names = [...new Set([...Object.keys(report.analysis.providers), ...Object.keys(cost)])];
  if (!names.length) return el("p", {class: "muted"}, "No model provider has answered yet.");
  const spent = (c) => !c ? "-" : `${c.input_tokens.toLocaleString()} in, ${c.output_tokens.toLocaleString()} out` +
    (c.cost === null ? " (no price set)"
      : `: ${c.cost.toFixed(c.cost < 1 ? 4 : 2)} at ${c.price_input_per_million} / ${c.price_output_per_million} per M`);
  return table(["Provider", "State", "Tokens and cost today"],
    names.map((name) => [name,
      paused[name] ? el("span", {class: "error", title: paused[name].detail}, paused[name].reason) : "ok",
      spent(cost[name])]));
}

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {scope: "col", class: typeof h === "object" ? "num" : null}, typeof h === "object" ? h.num : h)))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((cell, i) =>
      // A cell lines up with its header: a numeric column's text ("3 s") too.
      el("td", {class: typeof cell === "number" || typeof headers[i] === "object" ? "num" : null},
         cell === null || cell === undefined ? "-" : typeof cell === "number" ? cell.toLocaleString() : cell))))));
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function lagOf(report, camera) {
  // Analysis lag per camera (now minus the end of its oldest unanalysed window), when the
  // daemon reports it; an older daemon does not, and the column shows pending jobs instead.
  return camera.analysis_lag_s ?? null;
}

async function loadStatus() {
  let report;
  try {
    report = await api("/api/status");
  } catch (error) {
    $("#system-health").textContent = `Status unavailable: ${error.message}`;
    return;
  }
  $("#system-health").textContent = report.healthy ? "Healthy." : `Needs attention: ${report.problems.join("; ")}`;
  const jobs = report.jobs;
  const states = ["pending", "processing", "completed", "failed"];
  $("#jobs").replaceChildren(
    table(["Camera", ...states.map((s) => ({num: s}))],
          [...Object.entries(jobs.by_camera).map(([cam, n]) => [cam, ...states.map((s) => n[s])]),
           ["All", ...states.map((s) => jobs[s])]]),
    el("p", {class: "muted"}, jobs.oldest_pending_age_s === null ? "No job pending."
      : `Oldest pending job: ${seconds(jobs.oldest_pending_age_s)} old.`));
  const anyLag = report.cameras.some((c) => lagOf(report, c) !== null);
  $("#lag").replaceChildren(table(["Camera", "State", "Segment age", {num: "Restarts"},
                                   {num: anyLag ? "Analysis lag" : "Pending"}],
    report.cameras.map((c) => [c.id, c.online ? "live" : "OFFLINE", seconds(c.segment_age_s),
                               c.ffmpeg_restarts,
                               anyLag ? seconds(lagOf(report, c)) : (jobs.by_camera[c.id]?.pending ?? 0)])));
  const today = report.tokens.today;
  const total = Object.values(today).reduce((sum, t) => sum + t.total, 0);
  $("#tokens").replaceChildren(
    table(["Camera", {num: "Tokens today"}], Object.entries(today).map(([cam, t]) => [cam, t.total])),
    el("p", {}, `Total ${total.toLocaleString()} tokens today (UTC day).`),
    providerTable(report));
  const children = report.daemon.children || {};
  $("#children").replaceChildren(report.daemon.running
    ? table(["Process", "State", {num: "Restarts"}],
            Object.entries(children).map(([name, c]) => [name, c.alive ? "alive" : "DOWN", c.restarts ?? 0]))
    : el("p", {class: "error"}, "The daemon is not running."));
  const a = report.archives;
  const used = a.budget_bytes ? el("meter", {min: 0, max: a.budget_bytes, value: a.bytes, "aria-label": "Archive use of budget"}) : null;
  $("#disk").replaceChildren(...[
    el("p", {}, `Archives: ${a.count} files, ${bytes(a.bytes)}` + (a.budget_bytes ? ` of ${bytes(a.budget_bytes)} budget` : " (no budget set)")),
    used,
    el("p", {}, `Free on the data disk: ${bytes(a.disk_free_bytes)} (minimum ${bytes(a.min_free_bytes)}).`),
    el("p", {}, `Kept (exempt from retention): ${a.kept ? `${a.kept.count} archives, ${bytes(a.kept.bytes)}` : "-"}.`),
  ].filter(Boolean));
  $("#failures").replaceChildren(report.failures.length
    ? table(["Job", "Camera", "Clip start", "Reason", ""], report.failures.map((f) => [
        String(f.id), f.camera_id, timeText(f.segment_start), f.error_message,
        el("button", {type: "button", onclick: (e) => retryJob(f.id, e.target)}, "Retry")]))
    : el("p", {class: "muted"}, "No failed jobs."));
}

async function retryJob(id, button) {
  button.disabled = true;
  try {
    await post(`/api/jobs/${id}/retry`);
    toast(`Job ${id} queued again.`);
    loadStatus();
  } catch (error) {
    toast(`Job ${id} not retried: ${error.message}`);
    button.disabled = false;
  }
}

// -- live updates ----------------------------------------------------------------------

function toast(text) {
  $("#toast").textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { $("#toast").textContent = ""; }, 6000);
}

function connectEvents() {
  // EventSource reconnects by itself; after a reconnect the page reloads what it shows,
  // since events sent while it was away are not replayed.
  const source = new EventSource("/api/events");
  state.events = source;
  let wasOpen = false;
  source.addEventListener("hello", () => {
    $("#connection").textContent = "Live updates on";
    if (wasOpen) refreshView();
    wasOpen = true;
  });
  source.addEventListener("error", () => {
    $("#connection").textContent = "Live updates reconnecting…";
    fetch("/api/session", {credentials: "same-origin"}).then((r) => r.json()).then((s) => {
      if (!s.signed_in) { source.close(); showSignIn(); }
    }).catch(() => {});
  });
  source.addEventListener("incident", (event) => {
    const incident = JSON.parse(event.data);
    state.latest[incident.camera_id] = {...(state.latest[incident.camera_id] || {}), incident};
    updateTile(incident.camera_id);
    toast(`New ${incident.severity} incident on ${cameraName(incident.camera_id)}: ${incident.category}`);
    if (state.view === "incidents" && state.page === 0 && matchesFilters(incident)) {
      const item = incidentItem(incident);
      item.firstChild.classList.add("new");
      $("#incident-list").prepend(item);
      state.total += 1;
      showCount();
      loadTimeline();
    }
    api(`/api/jobs?camera=${encodeURIComponent(incident.camera_id)}&state=completed&limit=1`).then((jobs) => {
      state.latest[incident.camera_id].score = jobs.jobs[0]?.safety_score;
      updateTile(incident.camera_id);
    }).catch(() => {});
  });
  source.addEventListener("acknowledged", (event) => {
    const done = JSON.parse(event.data);
    const shown = state.dialogIncident;
    if (shown && shown.id === done.id) {
      Object.assign(shown, done);
      $("#ack-state").textContent = ackText(shown);
    }
    const item = document.querySelector(`[data-incident="${done.id}"] .acked`);
    if (item) item.textContent = ackText(done);
  });
  source.addEventListener("camera", (event) => {
    const change = JSON.parse(event.data);
    const camera = state.cameras.find((c) => c.id === change.id);
    if (camera) camera.online = change.online;
    updateTile(change.id);
    toast(`Camera ${change.id} is ${change.online ? "back online" : "OFFLINE"}`);
  });
  source.addEventListener("job_failed", (event) => {
    const job = JSON.parse(event.data);
    toast(`Job ${job.id} (${job.camera_id}) failed: ${job.error_message}`);
    if (state.view === "system") loadStatus();
  });
}

function refreshView() {
  loadLatest().catch(() => {});
  if (state.view === "incidents") loadIncidents();
  if (state.view === "system") loadStatus();
}

start().catch((error) => { $("#connection").textContent = `Console failed to start: ${error.message}`; });
