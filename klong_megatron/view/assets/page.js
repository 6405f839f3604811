"use strict";
const D = JSON.parse(document.getElementById("klong-data").textContent);
const ERR = [];
window.addEventListener("error", e => { ERR.push(String(e.message)); setStatus(); });
const $ = id => document.getElementById(id);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
const CHUNK = 40, FOLD = %FOLD%, FOLD_LINES = 30;
let ready = false;
function setStatus(extra) {
  const s = $("status"); Object.assign(s.dataset, extra || {}); s.dataset.errors = String(ERR.length);
  s.textContent = (s.dataset.state || "") + (ERR.length ? " | errors: " + ERR.join("; ") : "");
}
function lazyList(container, n, make) {
  let next = 0; const sentinel = el("div");
  const more = () => { const end = Math.min(n, next + CHUNK);
    for (; next < end; next++) container.insertBefore(make(next), sentinel);
    if (next >= n) io.disconnect(); };
  const io = new IntersectionObserver(es => { if (es.some(e => e.isIntersecting)) more(); });
  container.appendChild(sentinel); more(); if (next < n) io.observe(sentinel);
}
function folded(text) {  // long texts: the first lines, the rest on demand
  const pre = el("pre"), lines = text.split("\n");
  if (text.length <= FOLD && lines.length <= FOLD_LINES) { pre.textContent = text; return pre; }
  pre.textContent = lines.slice(0, FOLD_LINES / 3).join("\n").slice(0, FOLD / 2) + "\n…";
  const more = el("button", "", "show all (" + lines.length + " lines, " + text.length + " chars)");
  more.onclick = () => { pre.textContent = text; more.remove(); };
  const box = el("div"); box.append(pre, more); return box;
}
function inMask(runs, p) {  // runs sorted [start, len]
  let lo = 0, hi = runs.length - 1;
  while (lo <= hi) { const m = (lo + hi) >> 1, r = runs[m];
    if (p < r[0]) hi = m - 1; else if (p >= r[0] + r[1]) lo = m + 1; else return true; }
  return false;
}
function heat(lp) {  // sampled log-prob -> colour: p=1 white, p->0 red
  if (lp === null || lp === undefined) return "";
  const p = Math.exp(lp), a = Math.min(1, 1 - p).toFixed(2); return "rgba(229,57,53," + a + ")";
}
function tokenStrip(t, s, e, step) {
  const box = el("div", "strip");
  if (step && step.tokens.length) {
    step.tokens.forEach((tok, k) => { const sp = el("span", "", tok);
      sp.style.background = heat(step.logprobs[k]); sp.title = "logprob " + step.logprobs[k]; box.appendChild(sp); });
    return box;
  }
  for (let p = s; p < e; p++) box.appendChild(el("span", inMask(t.mask, p) ? "t" : "", t.tok[p]));
  return box;
}
function msgCard(t, i) {
  const m = t.messages[i], step = t.steps[String(i)];
  const card = el("div", "msg " + m.role); card.dataset.index = i;
  const hd = el("div", "hd", "#" + i + " " + m.role + (m.name ? " (" + m.name + ")" : "") +
    " · " + (m.span[1] - m.span[0]) + " tokens" + (m.trained ? " · " + m.trained + " trained" : ""));
  if (m.pinned) hd.appendChild(el("span", "chip", "pinned"));
  if (step) for (const [k, v] of [["v", step.version], ["gen", step.gen_s + " s"], ["finish", step.finish_reason],
                                  ["window", step.window], ["context", step.context_len]])
    if (v !== undefined && v !== null) hd.appendChild(el("span", "chip", k + " " + v));
  card.appendChild(hd);
  if (m.reasoning) { const r = el("details"); r.appendChild(el("summary", "", "reasoning"));
    r.appendChild(folded(m.reasoning)); card.appendChild(r); }
  if (m.content) card.appendChild(folded(m.content));
  for (const c of m.tool_calls || []) card.appendChild(el("div", "call", c.name + "(" + c.arguments + ")"));
  const b = el("button", "", step ? "sampled tokens (log-prob heat map)" : "tokens (green: trained)");
  let strip = null;
  b.onclick = () => { if (strip) { strip.remove(); strip = null; } else { strip = tokenStrip(t, m.span[0], m.span[1], step);
    card.appendChild(strip); } };
  card.appendChild(b); return card;
}
const KINDS = ["prefix", "marker", "carried", "new"];
function windowRow(t, j) {
  const w = t.windows[j], row = el("div", "win");
  const counts = {}; for (const [, k, a, b] of w.segments) counts[k] = (counts[k] || 0) + (b - a);
  row.appendChild(el("div", "hd", "window " + w.index + ": " + w.tokens + " tokens, " + w.trained + " trained · " +
    KINDS.filter(k => counts[k]).map(k => k + " " + counts[k]).join(" · ") + (w.elided ? " · elided " + w.elided : "")));
  const bar = el("div", "bar");
  for (const [msg, k, a, b] of w.segments) { const d = el("div", "k-" + k);
    d.style.width = (100 * (b - a) / w.tokens) + "%"; d.title = k + " msg " + msg + ": " + (b - a) + " tokens"; bar.appendChild(d); }
  let strip = null;
  bar.onclick = () => { if (strip) { strip.remove(); strip = null; return; } strip = el("div", "strip");
    let mk = 0; const trained = w.trained_runs;
    for (const [start, len] of w.runs) {
      if (start < 0) { strip.appendChild(el("span", "m", w.markers[mk++])); continue; }
      for (let p = start; p < start + len; p++) strip.appendChild(el("span", inMask(trained, p) ? "t" : "", t.tok[p]));
      strip.appendChild(el("span", "seg", "")); }
    row.appendChild(strip); };
  row.appendChild(bar); return row;
}
function showTrajectory(k) {
  const t = D.trajectories[k], main = $("main"); main.innerHTML = "";
  document.querySelectorAll("#side div").forEach((d, j) => d.classList.toggle("sel", j === k));
  main.appendChild(el("h2", "", t.id + " (" + t.kind + ")"));
  const sum = el("table", "sum");
  for (const [key, v] of Object.entries(t.summary)) { const tr = el("tr"); tr.append(el("td", "", key),
    el("td", "", typeof v === "object" ? JSON.stringify(v) : String(v))); sum.appendChild(tr); }
  main.appendChild(sum);
  const tabs = el("div", "tabs"), body = el("div");
  const conv = el("button", "", t.messages.length + " messages"), wins = el("button", "", t.windows.length + " windows");
  tabs.append(conv, wins); main.append(tabs, body);
  conv.onclick = () => { conv.className = "on"; wins.className = ""; body.innerHTML = "";
    lazyList(body, t.messages.length, i => msgCard(t, i)); };
  wins.onclick = () => { wins.className = "on"; conv.className = ""; body.innerHTML = "";
    const lg = el("div", "legend"); for (const k of KINDS) { const s = el("span"); const sw = el("span", "k-" + k, "   ");
      s.append(sw, " " + k); lg.appendChild(s); } body.appendChild(lg);
    lazyList(body, t.windows.length, j => windowRow(t, j)); };
  conv.onclick();
}
function gradeNode(n, depth) {
  const leaf = !n.children.length, d = el(leaf ? "div" : "details", "node");
  if (!leaf && depth < 2) d.open = true;
  const head = el(leaf ? "div" : "summary");
  const sc = n.score === null || n.score === undefined ? "–" : Number(n.score).toFixed(2);
  head.appendChild(el("span", "score" + (n.grade && !n.grade.valid ? " inv" : ""), n.grade && !n.grade.valid ? "invalid" : sc));
  head.appendChild(el("span", "", (n.category ? "[" + n.category + "] " : "") + "w" + n.weight + " " + n.requirements));
  d.appendChild(head);
  if (n.grade) d.appendChild(el("div", "expl", n.grade.explanation || ""));
  if (!leaf) { let filled = false; const fill = () => { if (filled) return; filled = true;
      for (const c of n.children) d.appendChild(gradeNode(c, depth + 1)); };
    if (d.open) fill(); d.addEventListener("toggle", fill); }
  return d;
}
function countLeaves(n) { return n.children.length ? n.children.reduce((a, c) => a + countLeaves(c), 0) : 1; }
function showGrade(k) {
  const g = D.grades[k], main = $("main"); main.innerHTML = "";
  document.querySelectorAll("#side div").forEach((d, j) => d.classList.toggle("sel", j === D.trajectories.length + k));
  main.appendChild(el("h2", "", (g.label || "grade") + ": score " + Number(g.score).toFixed(3)));
  main.appendChild(el("div", "hd", Object.entries(g.per_category).map(([c, v]) => c + " " + Number(v).toFixed(3)).join(" · ") +
    (g.invalid.length ? " · " + g.invalid.length + " invalid leaves" : "")));
  main.appendChild(gradeNode(g.tree, 0));
}
function start() {
  const side = $("side");
  D.trajectories.forEach((t, k) => { const r = t.summary.reward;
    const d = el("div", "", (r !== undefined ? Number(r).toFixed(2) + " · " : "") + t.id); d.onclick = () => showTrajectory(k); side.appendChild(d); });
  D.grades.forEach((g, k) => { const d = el("div", "", "grade · " + (g.label || k)); d.onclick = () => showGrade(k); side.appendChild(d); });
  if (D.trajectories.length) showTrajectory(0); else if (D.grades.length) showGrade(0);
  // #windows opens the windows tab, #open also opens the first token strip (used by tests and links)
  if (location.hash.includes("windows")) document.querySelector(".tabs button:nth-child(2)")?.click();
  if (location.hash.includes("open")) document.querySelector(".bar, .msg button")?.click();
  const t = D.trajectories[0];
  setStatus({ state: "ready", trajectories: String(D.trajectories.length), turns: String(t ? t.messages.length : 0),
    windows: String(t ? t.windows.length : 0), leaves: String(D.grades.length ? countLeaves(D.grades[0].tree) : 0),
    rendered: String(document.querySelectorAll(".msg, .win").length), strips: String(document.querySelectorAll(".strip").length),
    stripTokens: String(document.querySelectorAll(".strip span").length), readyMs: performance.now().toFixed(0) });
}
start();
