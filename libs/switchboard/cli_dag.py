"""`switchboard dag`: a workflow's DAG with each task's status, as ascii, mermaid or a self-contained SVG.

All three share one layered layout: a task's layer is its depth, the longest path to it from a root, so
every edge points down. Within a layer tasks keep the workflow's order. No randomness and no dict-order
surprises: the same view always renders to the same text (tests compare the ascii exactly).
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape, quoteattr

MARKERS = {"pending": "[ ]", "queued": "[.]", "running": "[>]", "waiting_input": "[?]", "succeeded": "[+]",
           "failed": "[x]", "cancelled": "[-]"}
COLOURS = {"pending": "#e5e7eb", "queued": "#bfdbfe", "running": "#fde68a", "waiting_input": "#a5f3fc",
           "succeeded": "#bbf7d0", "failed": "#fecaca", "cancelled": "#d1d5db"}
STROKES = {"pending": "#6b7280", "queued": "#2563eb", "running": "#d97706", "waiting_input": "#0891b2",
           "succeeded": "#16a34a", "failed": "#dc2626", "cancelled": "#4b5563"}


def layers(tasks: list[dict]) -> list[list[dict]]:
    """Tasks grouped by depth (longest path from a root), in the workflow's order within a layer."""
    by_id = {t["id"]: t for t in tasks}
    depth: dict[str, int] = {}

    def depth_of(task_id: str) -> int:
        # Iterative would be needed for 10,000-deep chains; the API refuses cycles, and a view's DAG is
        # drawn for people, so recursion with memo is plenty here.
        if task_id not in depth:
            parents = [p for p in by_id[task_id].get("depends_on") or [] if p in by_id]
            depth[task_id] = 1 + max((depth_of(p) for p in parents), default=-1)
        return depth[task_id]

    grouped: list[list[dict]] = []
    for task in tasks:
        d = depth_of(task["id"])
        while len(grouped) <= d:
            grouped.append([])
        grouped[d].append(task)
    return grouped


def edges(tasks: list[dict]) -> list[tuple[str, str]]:
    ids = {t["id"] for t in tasks}
    return [(p, t["id"]) for t in tasks for p in t.get("depends_on") or [] if p in ids]


def ascii_dag(view: dict) -> str:
    """Layers top-down, one task a line: marker, id, capability, status, and the tasks it waits for."""
    tasks = view["tasks"]
    width = max([len(t["id"]) for t in tasks] + [4])
    cap_width = max([len(t["capability"]) for t in tasks] + [4])
    name = f" ({view['name']})" if view.get("name") else ""
    lines = [f"workflow {view['workflow_id']}{name}: {view['status']}"]
    for number, layer in enumerate(layers(tasks)):
        lines.append(f"layer {number}")
        for task in layer:
            parents = task.get("depends_on") or []
            after = f"  <- {', '.join(parents)}" if parents else ""
            lines.append(f"  {MARKERS.get(task['status'], '[?]')} {task['id']:<{width}}  "
                         f"{task['capability']:<{cap_width}}  {task['status']}{after}".rstrip())
    lines.append("legend: " + "  ".join(f"{m} {s}" for s, m in MARKERS.items()))
    return "\n".join(lines)


def _mermaid_ids(tasks: list[dict]) -> dict[str, str]:
    # Task ids may hold any character and mermaid reserves words such as `end`: prefix and sanitize,
    # and number any that collide after sanitizing.
    ids: dict[str, str] = {}
    used: set[str] = set()
    for index, task in enumerate(tasks):
        node = "t_" + re.sub(r"\W", "_", task["id"])
        if node in used:
            node = f"{node}_{index}"
        used.add(node)
        ids[task["id"]] = node
    return ids


def mermaid_dag(view: dict) -> str:
    """A `flowchart TD` with a classDef per status, ready for a Markdown ```mermaid block."""
    tasks = view["tasks"]
    ids = _mermaid_ids(tasks)
    lines = ["flowchart TD"]
    for task in tasks:
        label = f"{task['id']}<br/>{task['capability']}: {task['status']}".replace('"', "#quot;")
        lines.append(f'  {ids[task["id"]]}["{label}"]:::{task["status"]}')
    lines += [f"  {ids[a]} --> {ids[b]}" for a, b in edges(tasks)]
    lines += [f"  classDef {s} fill:{COLOURS[s]},stroke:{STROKES[s]}" for s in MARKERS]
    return "\n".join(lines)


BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 170, 46, 30, 56, 20


def svg_dag(view: dict) -> str:
    """A standalone SVG: one <rect class="task"> per task, laid out by layer, lines parent to child."""
    grouped = layers(view["tasks"])
    widest = max(len(layer) for layer in grouped)
    width = 2 * MARGIN + widest * BOX_W + (widest - 1) * GAP_X
    top = MARGIN + 24  # room for the title
    height = top + len(grouped) * BOX_H + (len(grouped) - 1) * GAP_Y + MARGIN
    where: dict[str, tuple[float, float]] = {}  # task id -> the box's top-left corner
    for row, layer in enumerate(grouped):
        row_width = len(layer) * BOX_W + (len(layer) - 1) * GAP_X
        x0 = (width - row_width) / 2  # centre each layer under the widest
        for column, task in enumerate(layer):
            where[task["id"]] = (x0 + column * (BOX_W + GAP_X), top + row * (BOX_H + GAP_Y))
    title = f"workflow {view['workflow_id']}" + (f" ({view['name']})" if view.get("name") else "") \
        + f": {view['status']}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker></defs>',
           '<rect width="100%" height="100%" fill="#ffffff"/>',
           f'<text x="{MARGIN}" y="{MARGIN + 8}" font-size="14" font-weight="bold">{escape(title)}</text>']
    for parent, child in edges(view["tasks"]):
        (px, py), (cx, cy) = where[parent], where[child]
        out.append(f'<line class="edge" x1="{px + BOX_W / 2:.1f}" y1="{py + BOX_H:.1f}" x2="{cx + BOX_W / 2:.1f}" '
                   f'y2="{cy:.1f}" stroke="#6b7280" stroke-width="1.5" marker-end="url(#arrow)"/>')
    for task in view["tasks"]:
        x, y = where[task["id"]]
        status = task["status"]
        out.append(f'<g><title>{escape(task["id"])}: {escape(status)}</title>'
                   f'<rect class="task" data-task={quoteattr(task["id"])} data-status={quoteattr(status)} '
                   f'x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="6" '
                   f'fill="{COLOURS.get(status, "#ffffff")}" stroke="{STROKES.get(status, "#000000")}" stroke-width="1.5"/>'
                   f'<text x="{x + BOX_W / 2:.1f}" y="{y + 19:.1f}" text-anchor="middle" font-weight="bold">'
                   f'{escape(_clip(task["id"]))}</text>'
                   f'<text x="{x + BOX_W / 2:.1f}" y="{y + 36:.1f}" text-anchor="middle" fill="#374151">'
                   f'{escape(_clip(task["capability"] + " · " + status))}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _clip(text: str, most: int = 24) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


RENDERERS = {"ascii": ascii_dag, "mermaid": mermaid_dag, "svg": svg_dag}
