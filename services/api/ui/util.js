// Small DOM helpers shared by the pages.

// h("tr", {dataset: {testid: "x"}, onclick}, child, "text", ...): an element; attributes by name.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "testid") node.dataset.testid = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "value") node.value = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const time = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString() : "–";
export const ago = (ts) => ts ? `${Math.max(0, Date.now() / 1000 - ts).toFixed(1)} s ago` : "–";
export const badge = (status, testid) => h("span", { class: `badge status-${status}`, testid }, status);
export const json = (value) => h("pre", { class: "json" }, JSON.stringify(value, null, 2));

// A confirmation in the page's own dialog (testable, unlike window.confirm): resolves true on Confirm.
export function confirmDialog(text) {
  const dialog = document.getElementById("confirm");
  dialog.querySelector("[data-testid=confirm-text]").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

export function flash(view, message, kind = "error") {
  const note = h("p", { class: `flash ${kind}`, testid: `flash-${kind}` }, message);
  view.prepend(note);
  setTimeout(() => note.remove(), 8000);
}
