// The console's shell: sign-in, hash routing, the live stream, and the stop-all banner on every page.

import { ApiError, api, follow, setToken, token } from "./api.js";
import { pages } from "./pages.js";

const view = document.getElementById("view");
const banner = document.querySelector("[data-testid=stop-banner]");
const live = document.querySelector("[data-testid=live-state]");
const ctx = { me: null, page: null, control: null, may: (p) => !!ctx.me?.permissions.includes(p) };

function signIn(message = "") {
  const dialog = document.getElementById("login");
  dialog.querySelector("[data-testid=login-error]").textContent = message;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      setToken(dialog.querySelector("input").value.trim());
      dialog.querySelector("input").value = "";
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

async function whoami() {
  for (let message = ""; ; message = "That token was refused.") {
    try {
      return await api("/v1/whoami");
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      await signIn(token() ? message : "");
    }
  }
}

function showControl(state) {
  ctx.control = state;
  banner.hidden = !state?.stopped;
}

function route() {
  const [, name = "workflows", ...rest] = (location.hash || "#/workflows").split("/");
  const page = pages[name] || pages.workflows;
  ctx.page?.leave?.();
  view.replaceChildren();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === `#/${name}`));
  ctx.page = page(view, ctx, decodeURIComponent(rest.join("/")));
}

function onEvent(event) {
  if (event.event === "control") showControl(event);
  if (event.event === "poll" && ctx.may("read")) api("/v1/control").then(showControl).catch(() => {});
  ctx.page?.onEvent?.(event);
}

async function boot() {
  ctx.me = await whoami();
  document.querySelector("[data-testid=whoami]").textContent = `${ctx.me.name} (${ctx.me.role})`;
  const out = document.querySelector("[data-testid=sign-out]");
  out.hidden = !token();
  out.onclick = () => { setToken(""); location.reload(); };
  // A submitter may read only its own workflows: the other pages, and the stream, are not for it.
  for (const name of ["agents", "dlq", "controls"]) {
    document.querySelector(`[data-testid=nav-${name}]`).hidden = !ctx.may("read");
  }
  showControl(ctx.may("read") ? await api("/v1/control") : null);
  follow(onEvent, (state) => { live.textContent = state; live.dataset.state = state; });
  window.addEventListener("hashchange", route);
  route();
}

boot().catch((err) => { view.textContent = `The console could not start: ${err.message}`; });
