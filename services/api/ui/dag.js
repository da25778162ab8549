// The workflow's DAG as SVG. dagre (vendor/dagre.min.js, a global) only computes positions; this draws them.

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 150, NODE_H = 46;

const el = (name, attrs = {}, text) => {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};

// tasks: [{id, status, capability, depends_on}]; returns the <svg>, whose nodes setStatus() recolours.
export function drawDag(tasks, onSelect) {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: "LR", nodesep: 18, ranksep: 50, marginx: 10, marginy: 10 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const t of tasks) g.setNode(t.id, { width: NODE_W, height: NODE_H });
  for (const t of tasks) for (const p of t.depends_on || []) g.setEdge(p, t.id);
  dagre.layout(g);
  const { width, height } = g.graph();
  const svg = el("svg", { width: Math.max(width, 200), height: Math.max(height, 60), class: "dag", "data-testid": "dag",
                          viewBox: `0 0 ${Math.max(width, 200)} ${Math.max(height, 60)}` });
  const defs = el("defs");
  defs.append(arrowHead());
  svg.append(defs);
  for (const e of g.edges()) {
    const points = g.edge(e).points;
    const d = points.map((p, i) => `${i ? "L" : "M"}${p.x},${p.y}`).join(" ");
    svg.append(el("path", { d, class: "edge", "marker-end": "url(#arrow)" }));
  }
  for (const t of tasks) {
    const n = g.node(t.id);
    const group = el("g", { class: `node status-${t.status}`, "data-testid": "dag-node", "data-task": t.id,
                            "data-status": t.status, transform: `translate(${n.x - NODE_W / 2},${n.y - NODE_H / 2})`,
                            tabindex: "0" });
    group.append(el("rect", { width: NODE_W, height: NODE_H, rx: 6 }));
    group.append(el("text", { x: 10, y: 19, class: "id" }, t.id.length > 20 ? `${t.id.slice(0, 19)}…` : t.id));
    group.append(el("text", { x: 10, y: 36, class: "sub" }, `${t.capability} · ${t.status}`));
    group.addEventListener("click", () => onSelect(t.id));
    group.addEventListener("keydown", (ev) => { if (ev.key === "Enter") onSelect(t.id); });
    svg.append(group);
  }
  return svg;
}

export function setStatus(svg, task) {
  const group = svg.querySelector(`g.node[data-task="${CSS.escape(task.id)}"]`);
  if (!group) return false;
  group.setAttribute("class", `node status-${task.status}`);
  group.setAttribute("data-status", task.status);
  group.querySelector("text.sub").textContent = `${task.capability} · ${task.status}`;
  return true;
}

function arrowHead() {
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
                                orient: "auto-start-reverse" });
  marker.append(el("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" }));
  return marker;
}
