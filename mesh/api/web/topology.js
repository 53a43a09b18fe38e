// edgemesh topology page: polls the node's API and draws peers, links and traffic.
// Everything from the API is untrusted text: it reaches the page only through textContent
// and setAttribute on fixed attribute names, never innerHTML.
"use strict";

const POLL_MS = 1000;
const MAX_DRAWN = 48; // graph nodes beyond this are listed in the table only
const LABEL_MAX = 24; // graph labels are cut; the table shows names in full
const SVG_NS = "http://www.w3.org/2000/svg";
const previous = new Map(); // peer_id -> {sent, received, t}

const str = (v) => (typeof v === "string" ? v : "");
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const shortId = (id) => str(id).slice(0, 12);

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

// A shard entry may be a string, or an object naming a model and a layer range.
function shardText(item) {
  if (typeof item === "string") return item;
  if (item && typeof item === "object") {
    const model = str(item.model) || str(item.name);
    const layers = Array.isArray(item.layers) ? item.layers : [item.start, item.end];
    const [a, b] = layers.map(num);
    if (model && a !== null && b !== null) return `${model} [${a}, ${b})`;
    if (model) return model;
  }
  try { return JSON.stringify(item).slice(0, 80); } catch { return "?"; }
}

function shards(v) {
  return Array.isArray(v) ? v.slice(0, 32).map(shardText).join(", ") : "";
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

function row(cells, cls, peerId) {
  const tr = el("tr", undefined, cls);
  if (peerId) tr.setAttribute("data-peer-id", peerId);
  for (const [text, tdClass] of cells) tr.appendChild(el("td", text, tdClass));
  return tr;
}

function drawTable(info, peers, now) {
  const body = document.querySelector("#peers tbody");
  const rows = [];
  let sentAll = 0;
  let receivedAll = 0;
  const peerRows = peers.map((p) => {
    const rtt = num(p.rtt_ms);
    const tps = num(p.tokens_per_s);
    sentAll += num(p.bytes_sent) || 0;
    receivedAll += num(p.bytes_received) || 0;
    const sources = Array.isArray(p.sources) ? p.sources.filter((s) => typeof s === "string") : [];
    return row([
      [shortId(p.peer_id), "id"], [str(p.name)], [str(p.state)],
      [rtt === null ? "-" : rtt.toFixed(2), "num"], [str(p.zone)],
      [shards(p.shards)], [shards(p.running)],
      [tps === null ? "-" : tps.toFixed(1), "num"],
      [bytes(num(p.bytes_sent)), "num"], [bytes(num(p.bytes_received)), "num"],
      [rates(p, now), "num"], [sources.join(" ")],
    ], "peer-row", str(p.peer_id));
  });
  const selfTps = num(info.tokens_per_s);
  rows.push(row([
    [shortId(info.peer_id), "id"], [str(info.name)], ["this node"], ["-", "num"],
    [str(info.zone)], [shards(info.shards)], [shards(info.running)],
    [selfTps === null ? "-" : selfTps.toFixed(1), "num"],
    [bytes(sentAll), "num"], [bytes(receivedAll), "num"], ["", "num"], [""],
  ], "peer-row self-row", str(info.peer_id)));
  body.replaceChildren(...rows, ...peerRows);
}

function drawGraph(info, peers) {
  const graph = document.getElementById("graph");
  const cx = 320;
  const cy = 170;
  const drawn = peers.slice(0, MAX_DRAWN);
  const edges = [];
  const nodes = [];
  const n = Math.max(drawn.length, 1);
  const place = (i) => { // on an ellipse; two peers sit left and right of this node
    const a = -Math.PI / 2 + Math.PI / n + (2 * Math.PI * i) / n;
    return [cx + 210 * Math.cos(a), cy + 115 * Math.sin(a)];
  };
  const node = (x, y, cls, id, name) => {
    const g = svg("g", { class: `node ${cls}`, "data-peer-id": id });
    const label = name || "(unnamed)";
    g.appendChild(svg("title", {}, `${label} ${id}`)); // full name on hover
    g.appendChild(svg("circle", { cx: x, cy: y, r: 22 }));
    g.appendChild(svg("text", { x, y: y + 38 },
      label.length > LABEL_MAX ? `${label.slice(0, LABEL_MAX - 1)}…` : label));
    g.appendChild(svg("text", { x, y: y + 51, class: "id" }, shortId(id)));
    return g;
  };
  drawn.forEach((p, i) => {
    const [x, y] = place(i);
    const state = str(p.state);
    const cls = /^[a-z]+$/.test(state) ? state : "unknown";
    edges.push(svg("line", { x1: cx, y1: cy, x2: x, y2: y, class: cls }));
    const rtt = num(p.rtt_ms);
    const label = [rtt === null ? "" : `${rtt.toFixed(1)} ms`, str(p.zone)].filter(Boolean);
    if (label.length) {
      edges.push(svg("text", { x: (cx + x) / 2, y: (cy + y) / 2 - 8, class: "link" },
        label.join(" · ")));
    }
    nodes.push(node(x, y, cls, str(p.peer_id), str(p.name)));
  });
  nodes.push(node(cx, cy, "self", str(info.peer_id), str(info.name)));
  const more = peers.length - drawn.length;
  if (more > 0) nodes.push(svg("text", { x: 590, y: cy + 150 }, `+${more} more`));
  graph.replaceChildren(...edges, ...nodes);
  // fit the drawing's height: two peers in a row need less room than a ring
  const ys = [cy, ...drawn.map((_, i) => place(i)[1])];
  const top = Math.min(...ys) - 40;
  graph.setAttribute("viewBox", `0 ${top} 640 ${Math.max(...ys) + 70 - top}`);
  document.body.setAttribute("data-drawn", String(drawn.length + 1));
}

function setStatus(status, text) {
  document.body.setAttribute("data-status", status);
  document.getElementById("status").textContent = text;
}

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store" });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

async function tick() {
  try {
    const [info, peers] = await Promise.all([getJSON("/v1/info"), getJSON("/v1/peers")]);
    const safeInfo = info && typeof info === "object" ? info : {};
    const list = Array.isArray(peers) ? peers.filter((p) => p && typeof p === "object") : [];
    const now = Date.now();
    document.getElementById("self").textContent =
      `${str(safeInfo.name)} · ${shortId(safeInfo.peer_id)} · mesh ${str(safeInfo.mesh)}`;
    drawGraph(safeInfo, list);
    drawTable(safeInfo, list, now);
    const connected = list.filter((p) => p.state === "connected").length;
    setStatus("ok", `${connected} of ${list.length} peers connected · ${new Date(now).toLocaleTimeString()}`);
  } catch (err) {
    setStatus("error", `node unreachable: ${err && err.message ? err.message : err}`);
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

tick();
