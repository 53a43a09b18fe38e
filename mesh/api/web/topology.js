// edgemesh topology page: polls the node's API and draws the mesh, what runs where, the
// running generations' routes and the tokens/s. Everything from the API is untrusted text:
// it reaches the page only through textContent and setAttribute on fixed attribute names,
// never innerHTML.
"use strict";

const POLL_MS = 1000;
const MAX_DRAWN = 48; // graph nodes beyond this are listed in the table only
const LABEL_MAX = 24; // graph labels are cut; the table shows names in full
const MAX_SERIES = 120; // seconds of the tokens/s plot
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#4f7ff0", "#e0703a", "#2e9e5b", "#9b59b6", "#c0392b", "#16a2b8", "#b7950b"];
const previous = new Map(); // peer_id -> {sent, received, t}
const modelNames = new Map(); // model id -> a name some member gives it (peers pull by id)

const str = (v) => (typeof v === "string" ? v : "");
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const list = (v) => (Array.isArray(v) ? v.filter((x) => x && typeof x === "object") : []);
const shortId = (id) => str(id).slice(0, 12);
const cut = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

function bytes(n) {
  if (n === null) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function pair(v) {
  if (!Array.isArray(v) || v.length !== 2) return null;
  const [a, b] = v.map(num);
  return a === null || b === null ? null : [a, b];
}

// A shard entry may be a string, or an object naming a model and a unit or layer range.
function shardText(item) {
  if (typeof item === "string") return item;
  if (item && typeof item === "object") {
    const id = str(item.model_id);
    const model = str(item.model) || str(item.name) || modelNames.get(id) || shortId(id);
    const range = pair(item.units) || pair(item.layers) || pair([item.start, item.end]);
    if (model && range) return `${model} [${range[0]}, ${range[1]})`;
    if (model) return model;
  }
  try { return JSON.stringify(item).slice(0, 80); } catch { return "?"; }
}

function shards(v) {
  return Array.isArray(v) ? v.slice(0, 32).map(shardText).join(", ") : "";
}

// A stage's layers [a, b) (half-open, as the route gives them), as the layers it runs.
function layerText([a, b]) {
  return b - 1 > a ? `L${a}–${b - 1}` : `L${a}`;
}

function hardware(hw) {
  if (!hw || typeof hw !== "object") return "";
  const parts = [str(hw.acc), str(hw.board)];
  const cores = num(hw.cores);
  if (cores !== null) parts.push(`${cores} cores`);
  const ram = num(hw.ram_mb);
  if (ram !== null) parts.push(`${(ram / 1024).toFixed(1)} GiB`);
  for (const g of list(hw.gpus).slice(0, 2)) parts.push(cut(str(g.name), 24));
  const gflops = num(hw.gflops);
  if (gflops !== null) parts.push(`${gflops.toFixed(0)} GFLOPS`);
  const cpu = str(hw.cpu);
  return [parts.filter(Boolean).join(" · "), cut(cpu, 40)].filter(Boolean).join("\n");
}

function memory(m) {
  const used = num(m.memory_used);
  const limit = num(m.memory_limit);
  if (used === null && limit === null) return "";
  return `${bytes(used)} / ${limit === null ? "no limit" : bytes(limit)}`;
}

function rates(p, now) {
  const sent = num(p.bytes_sent);
  const received = num(p.bytes_received);
  const id = str(p.peer_id);
  const before = previous.get(id);
  previous.set(id, { sent, received, t: now });
  if (!before || sent === null || received === null || now <= before.t) return "-";
  const dt = (now - before.t) / 1000;
  const up = Math.max(0, (sent - before.sent) / dt);
  const down = Math.max(0, (received - before.received) / dt);
  return `${bytes(up)}/s / ${bytes(down)}/s`;
}

// Members from /v1/mesh, joined with this node's own peer table (state, RTT, bytes).
function members(info, peers, mesh) {
  const me = str(info.peer_id) || str(mesh.self);
  const byId = new Map(peers.map((p) => [str(p.peer_id), p]));
  const out = new Map();
  const add = (m, p) => {
    const id = str(m.peer_id) || str(p.peer_id);
    if (!id || out.has(id)) return;
    const state = id === me ? "self" : str(p.state) || (m.reachable ? "connected" : "reported");
    out.set(id, { ...m, peer: p, id, name: str(m.name) || str(p.name), state });
  };
  for (const m of list(mesh.members)) add(m, byId.get(str(m.peer_id)) || {});
  if (!out.has(me)) add(info, {});
  for (const p of peers) add({}, p); // in the peer table, not (yet) in the mesh view
  return [...out.values()];
}

function row(cells, cls, peerId) {
  const tr = el("tr", undefined, cls);
  if (peerId) tr.setAttribute("data-peer-id", peerId);
  for (const [text, tdClass] of cells) tr.appendChild(el("td", text, tdClass));
  return tr;
}

function drawTable(all, me, now, names) {
  const body = document.querySelector("#peers tbody");
  let sentAll = 0;
  let receivedAll = 0;
  for (const m of all) {
    sentAll += num(m.peer.bytes_sent) || 0;
    receivedAll += num(m.peer.bytes_received) || 0;
  }
  const rows = all.map((m) => {
    const self = m.id === me;
    const p = m.peer;
    const rtt = num(p.rtt_ms);
    const tps = num(m.tokens_per_s);
    const runs = list(m.running).map((s) => {
      const owner = str(s.owner);
      return `${shardText(s)} for ${owner === me ? "this node" : names.get(owner) || shortId(owner)}`;
    });
    const addrs = Array.isArray(m.addresses) ? m.addresses.filter((a) => typeof a === "string") : [];
    const sent = self ? sentAll : num(p.bytes_sent);
    const received = self ? receivedAll : num(p.bytes_received);
    return row([
      [shortId(m.id), "id"], [m.name], [self ? "this node" : m.state], [hardware(m.hw), "hw"],
      [memory(m), "num"], [shards(m.shards), "list"], [runs.join(", "), "list"],
      [tps === null ? "-" : tps.toFixed(1), "num"], [str(m.zone)], [addrs.join(" "), "list"],
      [self ? "0" : rtt === null ? "-" : rtt.toFixed(2), "num"],
      [bytes(sent), "num"], [bytes(received), "num"],
      [self ? rates({ peer_id: m.id, bytes_sent: sent, bytes_received: received }, now)
        : rates(p, now), "num"],
    ], self ? "peer-row self-row" : "peer-row", m.id);
  });
  body.replaceChildren(...rows);
}

function place(n, i) { // on an ellipse, the first (this node) at the top
  const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(n, 1);
  return n === 1 ? [320, 190] : [320 + 230 * Math.cos(a), 190 + 125 * Math.sin(a)];
}

function graphNode(m, x, y) {
  const cls = /^[a-z]+$/.test(m.state) ? m.state : "unknown";
  const g = svg("g", { class: `node ${cls}`, "data-peer-id": m.id });
  const label = m.name || "(unnamed)";
  g.appendChild(svg("title", {}, `${label} ${m.id}`)); // full name on hover
  g.appendChild(svg("circle", { cx: x, cy: y, r: 20 }));
  g.appendChild(svg("text", { x, y: y + 34 }, cut(label, LABEL_MAX)));
  g.appendChild(svg("text", { x, y: y + 46, class: "id" }, shortId(m.id)));
  return g;
}

function drawGraph(all, me, mesh, gens, colorOf) {
  const graph = document.getElementById("graph");
  const drawn = all.slice(0, MAX_DRAWN);
  const at = new Map(drawn.map((m, i) => [m.id, place(drawn.length, i)]));
  const stateOf = new Map(drawn.map((m) => [m.id, m.state]));
  const edges = [];
  const labels = [];
  for (const link of list(mesh.links)) {
    const a = str(link.a);
    const b = str(link.b);
    if (!at.has(a) || !at.has(b)) continue;
    const [x1, y1] = at.get(a);
    const [x2, y2] = at.get(b);
    const other = a === me ? b : b === me ? a : null;
    const state = other === null ? "reported" : stateOf.get(other);
    const cls = /^[a-z]+$/.test(state) ? state : "unknown";
    edges.push(svg("line", { x1, y1, x2, y2, class: `link ${cls}`, "data-a": a, "data-b": b }));
    const rtt = num(link.rtt_ms);
    if (rtt !== null) {
      labels.push(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "rtt" },
        `${rtt.toFixed(1)} ms`));
    }
  }
  const bands = [];
  gens.forEach((g, gi) => {
    const stages = list(g.stages).filter((s) => at.has(str(s.peer_id)));
    const path = [str(g.coordinator), ...stages.map((s) => str(s.peer_id))].filter((p) => at.has(p));
    const points = path.map((p) => at.get(p).map((v) => v + gi * 4).join(",")).join(" ");
    edges.push(svg("polyline", { points, class: "route", stroke: COLORS[gi % COLORS.length],
      "data-generation": gi }));
    stages.forEach((s) => {
      const [x, y] = at.get(str(s.peer_id));
      const layers = pair(s.layers) || [0, 0];
      const bx = x + 24;
      const by = y - 22 + gi * 14;
      bands.push(svg("rect", { x: bx, y: by, width: 58, height: 12, rx: 2,
        fill: colorOf(str(s.peer_id)), class: "band node-band", "data-peer-id": str(s.peer_id),
        "data-layers": `${layers[0]}-${layers[1]}`, "data-generation": gi }));
      bands.push(svg("text", { x: bx + 29, y: by + 9.5, class: "band-label" }, layerText(layers)));
    });
  });
  const nodes = drawn.map((m) => graphNode(m, ...at.get(m.id)));
  const more = all.length - drawn.length;
  if (more > 0) nodes.push(svg("text", { x: 590, y: 360 }, `+${more} more`));
  graph.replaceChildren(...edges, ...labels, ...nodes, ...bands);
  const ys = drawn.length ? drawn.map((m) => at.get(m.id)[1]) : [190];
  const top = Math.min(...ys) - 35;
  graph.setAttribute("viewBox", `0 ${top} 640 ${Math.max(...ys) + 60 - top}`);
  document.body.setAttribute("data-drawn", String(drawn.length));
}

// Each running generation as a bar of its model's layers, one band per stage.
function drawRoutes(gens, names, colorOf) {
  const routes = document.getElementById("routes");
  const out = [];
  const width = 410;
  gens.forEach((g, gi) => {
    const y = gi * 44;
    const tps = num(g.tokens_per_s);
    const coord = names.get(str(g.coordinator)) || shortId(g.coordinator);
    out.push(svg("text", { x: 0, y: y + 12, class: "gen" }, `${cut(str(g.model), 20)} · from ${cut(coord, 16)} · ${num(g.tokens) || 0} tokens · ${tps === null ? "-" : tps.toFixed(1)} tok/s`));
    out.push(svg("rect", { x: 0, y: y + 18, width, height: 20, class: "track" }));
    const total = Math.max(num(g.n_layers) || 1, 1);
    for (const s of list(g.stages)) {
      const layers = pair(s.layers);
      if (!layers) continue;
      const pid = str(s.peer_id);
      const x = (width * layers[0]) / total;
      const w = Math.max((width * (layers[1] - layers[0])) / total - 1, 2);
      out.push(svg("rect", { x, y: y + 18, width: w, height: 20, fill: colorOf(pid),
        class: "band layer-band", "data-peer-id": pid, "data-layers": `${layers[0]}-${layers[1]}`,
        "data-generation": gi }));
      out.push(svg("text", { x: x + w / 2, y: y + 32, class: "band-label" },
        cut(`${names.get(pid) || shortId(pid)} ${layerText(layers)}`, Math.max(Math.floor(w / 6), 3))));
    }
  });
  if (!gens.length) out.push(svg("text", { x: 0, y: 14 }, "no generation is running"));
  routes.replaceChildren(...out);
  routes.setAttribute("viewBox", `0 0 420 ${Math.max(gens.length * 44, 24)}`);
  document.body.setAttribute("data-routes", String(gens.length));
}

const series = (v) => (Array.isArray(v) ? v.slice(-MAX_SERIES).map((x) => num(x) || 0) : []);

// Per-second series summed, aligned on their last (most recent) second.
function summed(all) {
  const n = Math.max(0, ...all.map((a) => a.length));
  const out = new Array(n).fill(0);
  for (const a of all) a.forEach((v, i) => { out[n - a.length + i] += v; });
  return out;
}

// The last minute as the nodes counted it: tokens of every running generation per second
// (thick), and the rows each member's stages ran per second (thin, in the member's colour).
function drawRate(gens, all, colorOf) {
  const now = gens.reduce((sum, g) => sum + (num(g.tokens_per_s) || 0), 0);
  const total = summed(gens.map((g) => series(g.rate_history)));
  const members = all.slice(0, COLORS.length).map((m) => [m.id, series(m.rate_history)]);
  const n = Math.max(2, total.length, ...members.map(([, s]) => s.length));
  const top = 1.25 * Math.max(1, ...total, ...members.flatMap(([, s]) => s));
  const y = (v) => 108 - (98 * v) / top;
  const line = (values, attrs) => svg("polyline", {
    points: values.map((v, i) => {
      const x = 30 + (385 * (i + n - values.length)) / (n - 1);
      return `${x.toFixed(1)},${y(v).toFixed(1)}`;
    }).join(" "),
    "data-samples": values.length,
    ...attrs,
  });
  const plot = document.getElementById("rate");
  plot.replaceChildren(
    svg("line", { x1: 30, y1: 108, x2: 415, y2: 108, class: "axis" }),
    svg("line", { x1: 30, y1: 10, x2: 30, y2: 108, class: "axis" }),
    svg("text", { x: 0, y: 14 }, top.toFixed(0)),
    svg("text", { x: 0, y: 110 }, "0"),
    svg("text", { x: 30, y: 120 }, `-${n} s`),
    svg("text", { x: 400, y: 120 }, "now"),
    svg("text", { x: 36, y: 20 }, `generations now ${now.toFixed(1)} tok/s · thin: each member's stages`),
    ...members.map(([id, s]) => line(s, { class: "member", stroke: colorOf(id), "data-peer-id": id })),
    line(total, { class: "total" }),
  );
}

function setStatus(status, text) {
  document.body.setAttribute("data-status", status);
  document.getElementById("status").textContent = text;
}

// The token the user pasted (chat.js keeps it for this tab): a node whose operator set
// EDGEMESH_API_TOKEN opens even its status reads only to it. Without one, none is sent.
function pastedToken() {
  try { return sessionStorage.getItem("edgemesh.api_token") || ""; } catch { return ""; }
}

async function getJSON(path) {
  const token = pastedToken();
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const resp = await fetch(path, { cache: "no-store", headers });
  if (resp.status === 401) {
    throw new Error(`${path} needs the node's API token: paste it in the chat box's token field`);
  }
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

function draw(info, peers, mesh, now) {
  const me = str(info.peer_id) || str(mesh.self);
  const all = members(info, peers, mesh);
  const names = new Map(all.map((m) => [m.id, m.name]));
  const palette = new Map(all.map((m, i) => [m.id, COLORS[i % COLORS.length]]));
  const colorOf = (id) => palette.get(id) || "#7f8c8d";
  const gens = list(mesh.generations).slice(0, 8);
  for (const item of [...gens, ...all.flatMap((m) => [...list(m.shards), ...list(m.running)])]) {
    if (str(item.model_id) && str(item.model) && modelNames.size < 256) {
      modelNames.set(str(item.model_id), str(item.model));
    }
  }
  document.getElementById("self").textContent =
    `${str(info.name)} · ${shortId(me)} · mesh ${str(info.mesh)}`;
  drawGraph(all, me, mesh, gens, colorOf);
  drawRoutes(gens, names, colorOf);
  drawRate(gens, all, colorOf);
  drawTable(all, me, now, names);
  const model = document.getElementById("chat-model");
  if (model && !model.value) { // a running model, else one this node has a name for
    const mine = all.find((m) => m.id === me);
    const known = mine && Array.isArray(mine.models) ? mine.models.map(str).find(Boolean) : "";
    model.value = (gens.length ? str(gens[0].model) : "") || known || "";
  }
  return all;
}

async function tick() {
  try {
    const [info, peers, mesh] = await Promise.all(
      [getJSON("/v1/info"), getJSON("/v1/peers"), getJSON("/v1/mesh")]);
    const safeInfo = info && typeof info === "object" ? info : {};
    const safeMesh = mesh && typeof mesh === "object" ? mesh : {};
    const now = Date.now();
    const all = draw(safeInfo, list(peers), safeMesh, now);
    const connected = list(peers).filter((p) => p.state === "connected").length;
    setStatus("ok", `${all.length} members · ${connected} linked here · ${new Date(now).toLocaleTimeString()}`);
  } catch (err) {
    setStatus("error", `node unreachable: ${err && err.message ? err.message : err}`);
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

tick();
