// vlmguard console, Recordings view: a day of footage per camera, played by wall-clock time.
// Loaded after console.js and uses its helpers (api, el, $, severityBadge, timeText).
//
// Each camera plays an HLS VOD playlist of an hour around the playhead (the server's
// /api/recordings/{camera}/index.m3u8); its segments carry EXT-X-PROGRAM-DATE-TIME, so a
// wall-clock time maps to a media time through hls.js's fragment list. The first selected
// camera leads; the others follow it to the same wall-clock time (several cameras in step).
// Times shown are local, like the rest of the console; the API is spoken in UTC.
"use strict";

(() => {
  const HOUR = 3600e3, MINUTE = 60e3, DAY = 24 * HOUR;
  const WINDOW_BEFORE = 10 * MINUTE, WINDOW = HOUR;  // what one playlist covers
  const ZOOMS = {day: DAY, hour: HOUR, ten: 10 * MINUTE};
  const DRIFT = 0.6;  // seconds a follower may be off the leader before it is moved
  const MAX_EXPORT = HOUR;
  // Loading starts where the player is sent (startLoad), not at the hour's first segment.
  const HLS_VOD = {enableWorker: true, maxBufferLength: 30, backBufferLength: 60, autoStartLoad: false};

  const R = {
    day: null, cameras: [], players: [], spans: {}, incidents: [], zoom: "day",
    wall: null, selection: null, playing: false, timer: null, hoverTimer: null, shown: false,
  };
  window.vlmguardRecordings = R;  // for the browser tests and the curious
  R.range = () => viewRange();

  const iso = (ms) => new Date(ms).toISOString();
  const pad = (n) => String(n).padStart(2, "0");
  const clock = (ms) => { const d = new Date(ms); return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`; };
  const dayText = (ms) => { const d = new Date(ms); return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`; };
  const midnight = (ms) => { const d = new Date(ms); return new Date(d.getFullYear(), d.getMonth(), d.getDate()).getTime(); };
  const span = (ms) => ms >= HOUR ? `${(ms / HOUR).toFixed(1)} h` : ms >= MINUTE ? `${Math.round(ms / MINUTE)} min` : `${Math.round(ms / 1000)} s`;

  // -- entering and leaving --------------------------------------------------------------

  // #/recordings[/<camera,...>[/<ISO time>]]: "open in recordings" lands on a time.
  R.show = async () => {
    const [, , cams, when] = location.hash.split("/").map(decodeURIComponent);
    const all = state.cameras.filter((c) => !c.node).map((c) => c.id);  // this box's own
    const wanted = cams ? cams.split(",").filter((c) => all.includes(c)) : [];
    const at = when ? Date.parse(when) : NaN;
    if (!R.shown) buildControls();
    R.shown = true;
    R.cameras = wanted.length ? wanted : (R.cameras.length ? R.cameras : all.slice(0, 4));
    R.day = Number.isFinite(at) ? midnight(at) : (R.day ?? midnight(Date.now()));
    fillControls();
    await loadDay();
    const start = Number.isFinite(at) ? at : (R.wall ?? latestFootage() ?? null);
    if (start !== null) await seekAll(start, Number.isFinite(at));
  };

  R.hide = () => {
    stopPlayers();
    hidePreview();
  };

  function buildControls() {
    $("#rec-day").addEventListener("change", async (event) => {
      const [y, m, d] = event.target.value.split("-").map(Number);
      if (!y) return;
      R.day = new Date(y, m - 1, d).getTime();
      R.selection = null;
      await loadDay();
      const first = firstFootage();
      if (first !== null) await seekAll(first, false);
    });
    $("#rec-latest").addEventListener("click", async () => {
      R.day = midnight(Date.now());
      fillControls();
      await loadDay();
      const last = latestFootage();
      if (last !== null) await seekAll(last, true);
    });
    for (const [id, seconds] of [["#rec-back-min", -60], ["#rec-back", -10], ["#rec-fwd", 10], ["#rec-fwd-min", 60]]) {
      $(id).addEventListener("click", () => step(seconds));
    }
    $("#rec-play").addEventListener("click", togglePlay);
    for (const button of document.querySelectorAll("#rec-zoom button")) {
      button.addEventListener("click", () => { R.zoom = button.dataset.zoom; renderTimeline(); });
    }
    $("#rec-mark-in").addEventListener("click", () => mark("in"));
    $("#rec-mark-out").addEventListener("click", () => mark("out"));
    $("#rec-clear").addEventListener("click", () => { R.selection = null; renderSelection(); });
    $("#rec-export").addEventListener("click", exportSelection);
    $("#view-recordings").addEventListener("keydown", (event) => {
      if (event.target.matches("input, select, textarea")) return;
      if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
        event.preventDefault();
        step((event.key === "ArrowLeft" ? -1 : 1) * (event.shiftKey ? 60 : 10));
      } else if (event.key === " " && !event.target.matches("button")) {
        event.preventDefault();
        togglePlay();
      }
    });
  }

  function fillControls() {
    $("#rec-day").value = dayText(R.day);
    const box = $("#rec-cameras");
    box.replaceChildren(el("legend", {}, "Cameras"), ...state.cameras.filter((c) => !c.node).map((camera) => {
      const input = el("input", {type: "checkbox", value: camera.id, checked: R.cameras.includes(camera.id)});
      input.addEventListener("change", async () => {
        R.cameras = [...box.querySelectorAll("input:checked")].map((i) => i.value);
        await loadDay();
        if (R.wall !== null) await seekAll(R.wall, R.playing);
      });
      return el("label", {class: "rec-camera"}, input, " ", camera.id);
    }), ...state.cameras.filter((c) => c.node && c.console_url).map((camera) =>
      // Another box's footage is on its disk: its recordings open in that box's console.
      el("a", {class: "rec-camera rec-elsewhere", target: "_blank", rel: "noopener",
               href: `${camera.console_url}#/recordings/${encodeURIComponent(camera.id)}`},
         `${camera.id} (on ${camera.node}) ↗`)));
  }

  // -- what was recorded that day ---------------------------------------------------------

  async function loadDay() {
    stopPlayers();
    const from = R.day, to = R.day + DAY;
    const query = `start=${encodeURIComponent(iso(from))}&end=${encodeURIComponent(iso(to))}`;
    const [reports, found] = await Promise.all([
      Promise.all(R.cameras.map((c) => api(`/api/recordings?camera=${encodeURIComponent(c)}&${query}`).catch(() => null))),
      api(`/api/incidents?since=${encodeURIComponent(iso(from))}&until=${encodeURIComponent(iso(to))}&limit=500`).catch(() => ({incidents: []}))]);
    R.spans = {};
    R.cameras.forEach((camera, n) => {
      R.spans[camera] = (reports[n]?.spans || []).map((s) => [Date.parse(s.start), Date.parse(s.end)]);
    });
    R.incidents = found.incidents.filter((i) => R.cameras.includes(i.camera_id));
    $("#rec-title-day").textContent = new Date(R.day).toLocaleDateString([], {weekday: "long", year: "numeric", month: "long", day: "numeric"});
    const total = R.cameras.reduce((sum, c) => sum + R.spans[c].reduce((s, [a, b]) => s + b - a, 0), 0);
    $("#rec-summary").textContent = R.cameras.length
      ? `${R.cameras.length} camera${R.cameras.length > 1 ? "s" : ""}, ${span(total)} recorded, ${R.incidents.length} incident${R.incidents.length === 1 ? "" : "s"}.`
      : "Choose one or more cameras.";
    buildPlayers();
    renderTimeline();
  }

  const footageAt = (camera, ms) => (R.spans[camera] || []).some(([a, b]) => a <= ms && ms < b);
  const nextFootage = (camera, ms) => {
    const later = (R.spans[camera] || []).filter(([, b]) => b > ms).map(([a]) => Math.max(a, ms));
    return later.length ? Math.min(...later) : null;
  };
  const latestFootage = () => {
    const ends = R.cameras.flatMap((c) => (R.spans[c] || []).map(([, b]) => b));
    return ends.length ? Math.max(...ends) - 30e3 : null;
  };
  const firstFootage = () => {
    const starts = R.cameras.flatMap((c) => (R.spans[c] || []).map(([a]) => a));
    return starts.length ? Math.min(...starts) : null;
  };

  // -- players ---------------------------------------------------------------------------

  function buildPlayers() {
    const grid = $("#rec-players");
    grid.classList.toggle("single", R.cameras.length === 1);
    grid.replaceChildren();
    R.players = R.cameras.map((camera) => {
      const video = el("video", {muted: true, playsinline: true, preload: "auto",
                                 "aria-label": `Recorded video of ${camera}`});
      video.muted = true;
      const note = el("div", {class: "rec-note", role: "status"});
      const time = el("span", {class: "rec-time"});
      const box = el("article", {class: "rec-player", "data-camera": camera}, video, note,
                     el("div", {class: "caption"}, el("strong", {}, camera), " ", time));
      grid.append(box);
      const player = {camera, video, note, time, hls: null, from: null, to: null, fragments: [], loading: null};
      video.addEventListener("ended", () => onEnded(player));
      return player;
    });
  }

  function stopPlayers() {
    clearInterval(R.timer);
    R.timer = null;
    R.playing = false;
    updatePlayButton();
    for (const player of R.players) {
      if (player.hls) player.hls.destroy();
      player.hls = null;
      player.video.removeAttribute("src");
      player.video.load();
    }
  }

  // Load the hour of footage around `wall` into the player; resolves once its fragments
  // are known (or it has none).
  function loadWindow(player, wall) {
    const from = Math.max(R.day, wall - WINDOW_BEFORE);
    const to = Math.min(R.day + DAY, Date.now(), from + WINDOW);
    if (player.hls) player.hls.destroy();
    player.hls = null;
    player.fragments = [];
    player.started = false;
    player.from = from;
    player.to = to;
    if (to <= from) return Promise.resolve(false);
    const url = `/api/recordings/${encodeURIComponent(player.camera)}/index.m3u8?start=${encodeURIComponent(iso(from))}&end=${encodeURIComponent(iso(to))}`;
    if (!window.Hls || !Hls.isSupported()) {
      player.video.src = url;  // Safari plays HLS itself: wall-clock from its start date
      return new Promise((done) => player.video.addEventListener("loadedmetadata", () => done(true), {once: true}));
    }
    const hls = new Hls(HLS_VOD);
    player.hls = hls;
    player.loading = new Promise((done) => {
      hls.on(Hls.Events.LEVEL_LOADED, (_event, data) => {
        player.fragments = data.details.fragments;
        done(true);
      });
      hls.on(Hls.Events.ERROR, (_event, data) => {
        if (!data.fatal) return;
        const gone = data.response?.code === 404;
        if (data.type === Hls.ErrorTypes.MEDIA_ERROR) { hls.recoverMediaError(); return; }
        note(player, gone ? (player.fragments.length ? "This footage was deleted (retention); playback stopped." : "No recording in this hour.")
                          : `Playback failed: ${data.details}.`);
        // The last frame stays on screen; the next seek loads the hour afresh.
        hls.stopLoad();
        player.video.pause();
        player.fragments = [];
        done(false);
      });
    });
    hls.loadSource(url);
    hls.attachMedia(player.video);
    return player.loading;
  }

  // Wall-clock time (ms) of what a player shows, from the fragment it is in.
  function wallOf(player) {
    const t = player.video.currentTime;
    if (!player.hls) {
      const start = player.video.getStartDate?.().getTime();
      return Number.isFinite(start) ? start + t * 1000 : null;
    }
    const f = player.fragments.find((f) => f.start <= t + 1e-3 && t < f.start + f.duration)
      || player.fragments[player.fragments.length - 1];
    return f && f.programDateTime !== null ? f.programDateTime + (t - f.start) * 1000 : null;
  }

  // Media time for a wall-clock time, or null when the player's playlist has no footage then.
  function mediaTime(player, wall) {
    if (!player.hls) {
      const start = player.video.getStartDate?.().getTime();
      return Number.isFinite(start) ? (wall - start) / 1000 : null;
    }
    const f = player.fragments.find((f) => f.programDateTime <= wall && wall < f.programDateTime + f.duration * 1000);
    return f ? f.start + (wall - f.programDateTime) / 1000 : null;
  }

  function note(player, text) {
    player.note.textContent = text;
    player.note.hidden = !text;
  }

  async function place(player, wall, play) {
    const inside = player.from !== null && wall >= player.from && wall < player.to && player.fragments.length;
    if (!footageAt(player.camera, wall)) {
      player.video.pause();
      const next = nextFootage(player.camera, wall);
      note(player, next === null ? "No recording after this time today." : `No recording at this time; next at ${clock(next)}.`);
      return false;
    }
    if (!inside && !(await loadWindow(player, wall))) return false;
    const target = mediaTime(player, wall);
    if (target === null) {
      note(player, "No recording at this time.");
      player.video.pause();
      return false;
    }
    note(player, "");
    if (player.hls && !player.started) {
      player.started = true;
      player.hls.startLoad(target);
    }
    player.video.currentTime = target;
    if (play) player.video.play().catch(() => {});
    else player.video.pause();
    return true;
  }

  // Every selected camera to `wall`; into the next footage when none has any then.
  async function seekAll(wall, play) {
    if (!R.cameras.some((c) => footageAt(c, wall))) {
      const next = R.cameras.map((c) => nextFootage(c, wall)).filter((n) => n !== null);
      if (next.length) wall = Math.min(...next);
    }
    R.wall = wall;
    R.playing = play;
    updatePlayButton();
    await Promise.all(R.players.map((p) => place(p, wall, play)));
    showTime();
    if (!R.timer) R.timer = setInterval(sync, 250);
  }

  const leader = () => R.players.find((p) => !p.video.paused && !p.note.textContent && p.fragments.length)
    || R.players.find((p) => !p.note.textContent && p.fragments.length);

  // Followers keep to the leader's wall-clock time.
  function sync() {
    if (document.hidden || !R.players.length) return;
    const lead = leader();
    const wall = lead ? wallOf(lead) : null;
    if (wall === null) return;
    R.wall = wall;
    for (const player of R.players) {
      if (player === lead) continue;
      const inside = player.fragments.length && wall >= player.from && wall < player.to;
      if (!footageAt(player.camera, wall)) {
        if (!player.video.paused) player.video.pause();
        const next = nextFootage(player.camera, wall);
        note(player, next === null ? "No recording after this time today." : `No recording at this time; next at ${clock(next)}.`);
      } else if (!inside) {
        if (!player.loading || player.loadingFor !== Math.floor(wall / WINDOW)) {
          player.loadingFor = Math.floor(wall / WINDOW);
          place(player, wall, R.playing);
        }
      } else {
        const mine = wallOf(player);
        if (player.note.textContent) note(player, "");
        if (mine === null || Math.abs(mine - wall) > DRIFT * 1000) {
          const target = mediaTime(player, wall);
          if (target !== null) player.video.currentTime = target;
        }
        if (R.playing && player.video.paused) player.video.play().catch(() => {});
        if (!R.playing && !player.video.paused) player.video.pause();
      }
    }
    showTime();
  }

  async function onEnded(player) {
    // The end of the loaded hour: go on with the next, if there is footage after it.
    if (player !== leader() && R.players.length > 1) return;
    const next = nextFootage(player.camera, player.to);
    if (next !== null && R.playing) await seekAll(next, true);
    else { R.playing = false; updatePlayButton(); }
  }

  function togglePlay() {
    if (R.wall === null) {
      const first = firstFootage();
      if (first !== null) seekAll(first, true);
      return;
    }
    R.playing = !R.playing;
    updatePlayButton();
    for (const player of R.players) {
      if (player.note.textContent) continue;
      if (R.playing) player.video.play().catch(() => {});
      else player.video.pause();
    }
  }

  function step(seconds) {
    if (R.wall === null) return;
    const target = Math.min(Math.max(R.wall + seconds * 1000, R.day), R.day + DAY - 1000);
    seekAll(target, R.playing);
  }

  function updatePlayButton() {
    const button = $("#rec-play");
    button.textContent = R.playing ? "Pause" : "Play";
    button.setAttribute("aria-pressed", String(R.playing));
  }

  function showTime() {
    $("#rec-clock").textContent = R.wall === null ? "--:--:--" : clock(R.wall);
    for (const player of R.players) {
      const mine = player.note.textContent ? null : wallOf(player);
      player.time.textContent = mine === null ? "" : clock(mine);
    }
    placePlayhead();
  }

  // -- the timeline ------------------------------------------------------------------------

  function viewRange() {
    const length = ZOOMS[R.zoom];
    if (R.zoom === "day") return [R.day, R.day + DAY];
    const centre = R.wall ?? R.day + DAY / 2;
    const from = Math.min(Math.max(centre - length / 2, R.day), R.day + DAY - length);
    return [from, from + length];
  }

  const percent = (ms, [from, to]) => `${((ms - from) / (to - from) * 100).toFixed(4)}%`;

  function renderTimeline() {
    const range = viewRange();
    for (const button of document.querySelectorAll("#rec-zoom button")) {
      button.setAttribute("aria-pressed", String(button.dataset.zoom === R.zoom));
    }
    const ruler = el("div", {class: "rec-ruler", "aria-hidden": "true"});
    const tick = R.zoom === "day" ? 3 * HOUR : R.zoom === "hour" ? 10 * MINUTE : MINUTE;
    // Labels are centred on their tick: none within 3 % of an edge, where half would stick out.
    const margin = (range[1] - range[0]) * 0.03;
    for (let t = Math.ceil((range[0] + margin) / tick) * tick; t <= range[1] - margin; t += tick) {
      const label = el("span", {}, clock(t).slice(0, 5));
      label.style.left = percent(t, range);
      ruler.append(label);
    }
    const tracks = R.cameras.map((camera) => track(camera, range));
    $("#rec-timeline").replaceChildren(el("div", {class: "rec-row"}, el("span"), ruler), ...tracks);
    renderSelection();
    placePlayhead();
  }

  function track(camera, range) {
    const bar = el("div", {class: "rec-bar", tabindex: "0", role: "slider", "data-camera": camera,
                           "aria-label": `${camera} timeline: click to play from a time, shift-drag to select for export`,
                           "aria-valuemin": 0, "aria-valuemax": 86400});
    for (const [a, b] of R.spans[camera] || []) {
      if (b <= range[0] || a >= range[1]) continue;
      const block = el("div", {class: "rec-span", title: `Recorded ${clock(a)}–${clock(b)}`});
      block.style.left = percent(Math.max(a, range[0]), range);
      block.style.width = `${((Math.min(b, range[1]) - Math.max(a, range[0])) / (range[1] - range[0]) * 100).toFixed(4)}%`;
      bar.append(block);
    }
    for (const incident of R.incidents.filter((i) => i.camera_id === camera)) {
      const at = Date.parse(incident.start_at);
      if (at < range[0] || at >= range[1]) continue;
      const mark = el("button", {type: "button", class: `mark sev sev-${incident.severity}`,
                                 title: `${incident.severity} ${incident.category} ${clock(at)}: ${incident.description}`,
                                 "aria-label": `${incident.severity} ${incident.category} at ${clock(at)}: play from here`},
                      incident.severity[0].toUpperCase());
      mark.style.left = percent(at, range);
      mark.addEventListener("click", (event) => { event.stopPropagation(); seekAll(at - 5000, true); });
      mark.addEventListener("pointerdown", (event) => event.stopPropagation());
      bar.append(mark);
    }
    bar.append(el("div", {class: "rec-selection", hidden: true}), el("div", {class: "rec-playhead"}));
    pointerOn(bar, camera);
    return el("div", {class: "rec-row"}, el("span", {class: "rec-name"}, camera), bar);
  }

  function timeAt(bar, clientX) {
    const box = bar.getBoundingClientRect();
    const [from, to] = viewRange();
    return from + Math.min(Math.max((clientX - box.left) / box.width, 0), 1) * (to - from);
  }

  // Click: play from there. Drag: scrub (pictures follow the pointer, the players move on
  // release). Shift-drag: select a range to export. Hover: the minute's picture.
  function pointerOn(bar, camera) {
    let down = null;
    bar.addEventListener("pointerdown", (event) => {
      down = {x: event.clientX, time: timeAt(bar, event.clientX), shift: event.shiftKey, moved: false};
      bar.setPointerCapture(event.pointerId);
    });
    bar.addEventListener("pointermove", (event) => {
      const time = timeAt(bar, event.clientX);
      preview(bar, camera, time, event.clientX);
      if (!down) return;
      if (Math.abs(event.clientX - down.x) > 4) down.moved = true;
      if (down.shift && down.moved) {
        R.selection = [Math.min(down.time, time), Math.max(down.time, time)];
        renderSelection();
      } else if (down.moved) {
        placePlayhead(time);
      }
    });
    bar.addEventListener("pointerup", (event) => {
      if (!down) return;
      const time = timeAt(bar, event.clientX);
      if (!(down.shift && down.moved)) seekAll(time, true);
      down = null;
    });
    bar.addEventListener("pointerleave", () => hidePreview());
    bar.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); togglePlay(); }
    });
  }

  function preview(bar, camera, time, clientX) {
    const tip = $("#rec-preview");
    const box = bar.getBoundingClientRect();
    const has = footageAt(camera, time);
    tip.hidden = false;
    tip.style.left = `${Math.min(Math.max(clientX - 90, 4), window.innerWidth - 184)}px`;
    tip.style.top = `${box.top + window.scrollY - 130}px`;
    $("#rec-preview-time").textContent = `${camera} ${clock(time)}${has ? "" : " · no recording"}`;
    const image = $("#rec-preview-image");
    clearTimeout(R.hoverTimer);
    if (!has) { image.hidden = true; return; }
    const minute = Math.floor(time / MINUTE) * MINUTE;
    const src = `/api/recordings/${encodeURIComponent(camera)}/thumbnail.jpg?at=${encodeURIComponent(iso(minute))}`;
    if (image.dataset.src === src) { image.hidden = false; return; }
    // One picture request per pause of the pointer, not one per pixel moved.
    R.hoverTimer = setTimeout(() => {
      image.dataset.src = src;
      image.onload = () => { image.hidden = false; };
      image.onerror = () => { image.hidden = true; };
      image.src = src;
    }, 120);
  }

  function hidePreview() {
    clearTimeout(R.hoverTimer);
    $("#rec-preview").hidden = true;
  }

  function placePlayhead(time = R.wall) {
    const range = viewRange();
    if (R.zoom !== "day" && time !== null && (time < range[0] || time >= range[1])) {
      renderTimeline();  // the playhead left a zoomed window: follow it
      return;
    }
    for (const head of document.querySelectorAll("#rec-timeline .rec-playhead")) {
      head.hidden = time === null;
      if (time !== null) head.style.left = percent(time, range);
    }
    for (const bar of document.querySelectorAll("#rec-timeline .rec-bar")) {
      bar.setAttribute("aria-valuenow", time === null ? 0 : Math.round((time - R.day) / 1000));
      bar.setAttribute("aria-valuetext", time === null ? "no time chosen" : clock(time));
    }
  }

  // -- export ------------------------------------------------------------------------------

  function mark(which) {
    if (R.wall === null) return;
    const [a, b] = R.selection || [R.wall, R.wall];
    R.selection = which === "in" ? [R.wall, Math.max(b, R.wall)] : [Math.min(a, R.wall), R.wall];
    renderSelection();
  }

  function renderSelection() {
    const range = viewRange();
    const sel = R.selection;
    for (const box of document.querySelectorAll("#rec-timeline .rec-selection")) {
      box.hidden = !sel || sel[1] <= range[0] || sel[0] >= range[1];
      if (box.hidden) continue;
      box.style.left = percent(Math.max(sel[0], range[0]), range);
      box.style.width = `${((Math.min(sel[1], range[1]) - Math.max(sel[0], range[0])) / (range[1] - range[0]) * 100).toFixed(4)}%`;
    }
    const length = sel ? sel[1] - sel[0] : 0;
    $("#rec-selection-text").textContent = sel
      ? `Selected ${clock(sel[0])}–${clock(sel[1])} (${span(length)})${length > MAX_EXPORT ? ": at most 1 h can be exported" : ""}`
      : "No selection: shift-drag on a timeline, or mark in and out.";
    $("#rec-export").disabled = !sel || length < 1000 || length > MAX_EXPORT;
  }

  function exportSelection() {
    const [a, b] = R.selection;
    for (const camera of R.cameras.filter((c) => (R.spans[c] || []).some(([s, e]) => s < b && e > a))) {
      const link = el("a", {href: `/api/recordings/${encodeURIComponent(camera)}/export.mp4?start=${encodeURIComponent(iso(a))}&end=${encodeURIComponent(iso(b))}`,
                            download: ""});
      document.body.append(link);
      link.click();
      link.remove();
    }
    toast(`Exporting ${span(b - a)} of footage as MP4…`);
  }
})();
