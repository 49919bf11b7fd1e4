// The admin web UI of starlette-hotdeploy: plain JavaScript, no build step, no dependency.
// It calls the admin API on this origin with the token of this tab (sessionStorage, never a
// cookie: another site's page cannot make the browser send it) and follows GET /events,
// read with fetch() because EventSource cannot send an Authorization header.
"use strict";

// The page is <prefix>/ui/ (or <prefix>/ui/index...): the API is <prefix>.
const API = location.pathname.replace(/\/ui\/[^/]*$/, "");
const TOKEN_KEY = "starlette-hotdeploy.token";
const SHARE_WINDOW = 5; // traffic samples (one a second) that a traffic share is computed over
const SHOWN_DEPLOYMENTS = 20;
const POLL_MS = 1000; // a followed deployment's record is re-read this often until it finished
const STEADY_STREAM_MS = 10000; // a stream that lasted this long resets the reconnect backoff
// While a canary runs, the packages are re-read this often for its analyses (they come with no
// event); its steps, promotion and abort come with events and are shown at once.
const CANARY_REFRESH_MS = 3000;

function freshState(token) {
  return {
    token,
    role: null,
    session: 0, // counts sign-ins and sign-outs: an answer for an older session is dropped
    packages: [],
    deployments: new Map(), // id -> record
    steps: new Map(), // deployment id -> Map(step name -> step), from records and step events
    traffic: [], // the last SHARE_WINDOW + 1 traffic events, all from one worker's stream
    following: null, // the id of the deployment started from this page
    expanded: new Set(), // ids of the deployments whose steps are shown
    stream: null, // the AbortController of the event stream
    live: false,
    refreshing: null,
    refreshed: 0, // when the last refresh started (Date.now())
  };
}

let state = freshState(sessionStorage.getItem(TOKEN_KEY));

const $ = (id) => document.getElementById(id);

// -- the API ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title || "";
  }
}

// Thrown for an answer that arrives after its session ended (signed out meanwhile): ignored.
class Stale extends Error {}

async function api(method, path, { body, headers } = {}) {
  const session = state.session;
  const response = await fetch(API + path, {
    method,
    body,
    cache: "no-store",
    headers: { Authorization: `Bearer ${state.token}`, ...headers },
  });
  const text = await response.text();
  if (session !== state.session) throw new Stale();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (!response.ok) throw new ApiError(response.status, data || {});
  return data;
}

// -- small DOM helpers (text only: no server string is ever parsed as HTML) -----------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function duration(ms) {
  if (ms === null || ms === undefined) return "…";
  return ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "";
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function notice(message) {
  $("notice").textContent = message || "";
  show($("notice"), Boolean(message));
}

// -- signing in and out ---------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  let me;
  try {
    me = await api("GET", "/whoami");
  } catch (error) {
    if (error instanceof Stale) return;
    state.token = null;
    if (error.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(`The token was refused: ${error.message}`);
    } else {
      // The server is down or failing: keep a stored token for the next try.
      showSignIn(`Cannot reach the admin API: ${error.message}`);
    }
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.role = me.role;
  showConsole();
}

function signOut(reason) {
  if (state.stream) state.stream.abort();
  sessionStorage.removeItem(TOKEN_KEY);
  // Forget everything this session saw; answers still on their way are dropped (Stale).
  state = { ...freshState(null), session: state.session + 1 };
  $("packages").replaceChildren();
  $("deployments").tBodies[0].replaceChildren();
  $("workers").tBodies[0].replaceChildren();
  $("store").textContent = "";
  $("progress-steps").replaceChildren();
  show($("progress"), false);
  notice(null);
  showSignIn(reason);
}

function showSignIn(reason) {
  show($("console"), false);
  show($("sign-out"), false);
  show($("role"), false);
  show($("live"), false);
  show($("sign-in"), true);
  $("sign-in-error").textContent = reason || "";
  show($("sign-in-error"), Boolean(reason));
  $("token").value = "";
  $("token").focus();
}

function canChange() {
  return state.role === "admin";
}

function showConsole() {
  show($("sign-in"), false);
  show($("console"), true);
  show($("sign-out"), true);
  $("role").textContent = canChange() ? "admin" : "read-only";
  show($("role"), true);
  document.body.classList.toggle("read-only", !canChange());
  show($("drop"), canChange());
  show($("read-only-note"), !canChange());
  refresh();
  follow();
}

// -- what the server holds ------------------------------------------------------------------

async function refresh() {
  // One refresh at a time; a request for another while one runs makes one more afterwards.
  if (state.refreshing) {
    state.refreshing.again = true;
    return;
  }
  state.refreshing = { again: false };
  state.refreshed = Date.now();
  try {
    const [packages, deployments, cluster] = await Promise.all([
      api("GET", "/packages"),
      api("GET", `/deployments?limit=${SHOWN_DEPLOYMENTS}`),
      // The store may be out of reach (503): the rest of the page still shows.
      api("GET", "/cluster").catch((error) => (error instanceof Stale ? Promise.reject(error) : error)),
    ]);
    state.packages = packages.packages;
    for (const record of deployments.deployments) remember(record, false);
    renderPackages();
    renderDeployments();
    renderProgress();
    renderWorkers(cluster);
  } catch (error) {
    if (error instanceof Stale) return;
    if (error.status === 401) return signOut("The token is no longer accepted.");
    notice(`Cannot read the packages: ${error.message}`);
  } finally {
    if (state.refreshing) {
      const again = state.refreshing.again;
      state.refreshing = null;
      if (again) refresh();
    }
  }
}

// How far a record has got: pending, decided, finished.
const progressOf = (record) => (record.finished_at ? 2 : record.outcome !== "pending" ? 1 : 0);

function remember(record, render = true) {
  const known = state.deployments.get(record.id);
  // A record never goes back: an older copy (the POST's answer, a late list) is ignored.
  if (!known || progressOf(record) >= progressOf(known)) state.deployments.set(record.id, record);
  for (const step of record.steps || []) rememberStep(record.id, step);
  if (render) {
    renderDeployments();
    renderProgress();
  }
}

function stepsOf(id) {
  if (!state.steps.has(id)) state.steps.set(id, new Map());
  return state.steps.get(id);
}

function rememberStep(id, step) {
  const steps = stepsOf(id);
  const known = steps.get(step.name);
  const done = (s) => s.ok !== null && s.ok !== undefined;
  if (!known || done(step) || !done(known)) steps.set(step.name, step); // a result stays
}

// -- the event stream -----------------------------------------------------------------------

async function follow() {
  if (state.stream) state.stream.abort(); // one stream a page, however often sign-in ran
  const controller = new AbortController();
  state.stream = controller;
  let delay = 500;
  while (!controller.signal.aborted) {
    const opened = Date.now();
    try {
      const response = await fetch(`${API}/events?traffic=true`, {
        headers: { Authorization: `Bearer ${state.token}` },
        cache: "no-store",
        signal: controller.signal,
      });
      if (response.status === 401) return signOut("The token is no longer accepted.");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setLive(true);
      state.traffic = []; // shares are differences within one stream (one worker's counters)
      refresh(); // what happened while the stream was down
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          try {
            received(block);
          } catch (error) {
            console.error("starlette-hotdeploy: an event could not be shown", error);
          }
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    setLive(false);
    // A stream that keeps closing at once is retried ever more slowly (up to 10 s).
    delay = Date.now() - opened > STEADY_STREAM_MS ? 500 : Math.min(delay * 2, 10000);
    await sleep(delay);
  }
}

function setLive(live) {
  state.live = live;
  show($("live"), live);
}

function received(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a comment: connected, keep-alive
    const [field, ...rest] = line.split(":");
    const value = rest.join(":").replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  const event = JSON.parse(data.join("\n"));
  if (type === "traffic") {
    if (state.traffic.length && state.traffic[0].worker !== event.worker) state.traffic = [];
    state.traffic.push(event);
    $("live").textContent = event.workers > 1 ? `live · ${event.workers} workers` : "live";
    if (state.traffic.length > SHARE_WINDOW + 1) state.traffic.shift();
    renderTraffic();
    if (runningCanary() && Date.now() - state.refreshed > CANARY_REFRESH_MS) refresh();
  } else if (type.startsWith("deployment.")) {
    remember(event.deployment);
    if (type !== "deployment.started") refresh();
  } else if (type.startsWith("step.")) {
    rememberStep(event.deployment_id, event.step);
    if (event.deployment_id === state.following) renderProgress();
    if (runningCanary(event.deployment_id)) refresh(); // a canary's step moved: its weight
  }
}

// -- deploying and the other operations -----------------------------------------------------

async function deploy(file) {
  state.following = null;
  $("progress-title").textContent = `Deploying ${file.name}`;
  $("progress-steps").replaceChildren();
  setOutcome("uploading…", "pending");
  show($("progress"), true);
  try {
    const record = await api("POST", "/packages?wait=false", {
      body: file,
      headers: { "Content-Type": "application/octet-stream" },
    });
    state.following = record.id;
    remember(record);
    poll(record.id);
  } catch (error) {
    if (error instanceof Stale) return;
    setOutcome(`Refused: ${error.message}`, "failed");
  } finally {
    $("archive").value = "";
  }
}

async function poll(id) {
  // The record itself, re-read until it finished: the progress also shows without the event
  // stream, and when another worker (whose events this stream does not carry) runs it.
  const session = state.session;
  while (state.session === session && state.following === id) {
    await sleep(POLL_MS);
    let record;
    try {
      record = await api("GET", `/deployments/${id}`);
    } catch (error) {
      if (error instanceof Stale) return;
      if (error.status === 401) return signOut("The token is no longer accepted.");
      continue; // the server is restarting, say: try again
    }
    remember(record);
    if (record.finished_at) return refresh();
  }
}

function setOutcome(text, outcome) {
  const node = $("progress-outcome");
  node.textContent = text;
  node.className = `outcome-${outcome}`;
}

function renderProgress() {
  const record = state.deployments.get(state.following);
  if (!record) return;
  const what = record.package ? `${record.package} ${record.to_version || ""}`.trim() : "the archive";
  $("progress-title").textContent = `Deploying ${what}`;
  $("progress-steps").replaceChildren(...stepRows(record.id).map((step) => stepItem(step)));
  if (record.outcome === "pending") setOutcome("running…", "pending");
  else if (record.outcome === "succeeded") {
    const drained = record.finished_at ? "" : " (the old version is draining)";
    setOutcome(`${what} is active, after ${duration(record.duration_ms)}${drained}`, "succeeded");
  } else {
    const where = record.error_step ? ` at ${record.error_step}` : "";
    setOutcome(`${record.outcome.replaceAll("_", " ")}${where}: ${record.error || "no cause recorded"}`, "failed");
  }
}

function stepRows(id) {
  return [...stepsOf(id).values()].sort((a, b) => a.started_at - b.started_at);
}

function stepItem(step) {
  const mark = step.ok === null || step.ok === undefined ? "running" : step.ok ? "ok" : "failed";
  return el(
    "li",
    { class: `step step-${mark}`, dataset: { step: step.name } },
    el("span", { class: "step-name" }, step.name),
    el("span", { class: "step-time" }, duration(step.duration_ms)),
    step.detail ? el("span", { class: "step-detail" }, step.detail) : null,
  );
}

function confirmAction(question, label) {
  const dialog = $("confirm");
  $("confirm-text").textContent = question;
  $("confirm-yes").textContent = label;
  dialog.showModal();
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").onclick = $("confirm-no").onclick = dialog.oncancel = null;
      dialog.close();
      resolve(answer);
    };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    dialog.oncancel = () => done(false);
  });
}

// `call` answers the operation's record, or null (a canary command answers the canary's state).
async function operate(question, label, call) {
  if (!(await confirmAction(question, label))) return;
  notice(null);
  try {
    const record = await call();
    if (record) remember(record);
  } catch (error) {
    if (error instanceof Stale) return;
    notice(`${label} failed: ${error.message}`);
  }
  refresh();
}

function rollback(pkg) {
  return operate(
    `Roll ${pkg.name} back from ${pkg.active_version} to ${pkg.previous_version}?`,
    "Roll back",
    () => api("POST", `/packages/${pkg.name}/rollback`),
  );
}

function activate(pkg, version) {
  return operate(`Make ${pkg.name} ${version} the active version?`, "Activate", () =>
    api("POST", `/packages/${pkg.name}/activate`, {
      body: JSON.stringify({ version }),
      headers: { "Content-Type": "application/json" },
    }),
  );
}

function undeploy(pkg) {
  return operate(
    `Undeploy ${pkg.name}? Its mount ${pkg.mount} stops answering once its requests drained.`,
    "Undeploy",
    () => api("DELETE", `/packages/${pkg.name}`),
  );
}

function promoteCanary(pkg, all) {
  const canary = pkg.canary;
  const question = all
    ? `Promote ${pkg.name} ${canary.version} all the way now? It becomes the active version on every worker, without waiting for its steps and analyses.`
    : `Move the canary ${pkg.name} ${canary.version} on to its next step now (from step ${canary.step} of ${canary.step_count}), without waiting for its analysis?`;
  return operate(question, all ? "Promote all" : "Promote", async () => {
    await api("POST", `/packages/${pkg.name}/canary/promote${all ? "?all=true" : ""}`);
    return null;
  });
}

function abortCanary(pkg) {
  const canary = pkg.canary;
  return operate(
    `Abort the canary ${pkg.name} ${canary.version}? Its users go back to ${pkg.active_version}; it drains and is unloaded.`,
    "Abort canary",
    async () => {
      await api("POST", `/packages/${pkg.name}/canary/abort`);
      return null;
    },
  );
}

// A package's running canary (any package's, or the one of the deployment `id`), if any.
function runningCanary(id) {
  return state.packages.some((pkg) => pkg.canary && (id === undefined || pkg.canary.deployment === id));
}

// -- rendering ------------------------------------------------------------------------------

// Re-rendering replaces the buttons: the focused one gets the focus back (keyboard users).
function keepingFocus(render) {
  const focused = document.activeElement?.dataset?.focus;
  render();
  if (focused) document.querySelector(`[data-focus="${CSS.escape(focused)}"]`)?.focus();
}

function renderPackages() {
  show($("no-packages"), state.packages.length === 0);
  keepingFocus(() => $("packages").replaceChildren(...state.packages.map(packageCard)));
  renderTraffic();
}

function packageCard(pkg) {
  const loaded = new Set(pkg.versions.map((v) => v.version));
  const stored = pkg.available_versions.filter((v) => !loaded.has(v.version));
  const requires = Object.entries(pkg.requires || {}).map(([name, spec]) => `${name} ${spec}`);
  return el(
    "article",
    { class: "package", dataset: { package: pkg.name } },
    el(
      "h3",
      {},
      el("span", { class: "package-name" }, pkg.name),
      " ",
      el("code", { class: "mount" }, pkg.mount),
      " ",
      el("span", { class: "active-version", title: "active version" }, pkg.active_version),
    ),
    el(
      "p",
      { class: "facts" },
      pkg.previous_version ? `previous ${pkg.previous_version}` : "no previous version",
      requires.length ? ` · requires ${requires.join(", ")}` : "",
      pkg.required_by.length ? ` · required by ${pkg.required_by.join(", ")}` : "",
      ` · workers: ${Object.entries(pkg.workers)
        .map(([worker, version]) => `${worker} → ${version || "none"}`)
        .join(", ")}`,
    ),
    el(
      "table",
      { class: "versions" },
      el(
        "thead",
        {},
        el("tr", {}, ["Version", "State", "In flight", "Served", "Traffic", "sha256", ""].map((h) => el("th", {}, h))),
      ),
      el("tbody", {}, pkg.versions.map((version) => versionRow(pkg, version))),
    ),
    stored.length
      ? el(
          "p",
          { class: "stored" },
          "Stored, not loaded: ",
          stored.map((v) =>
            el(
              "span",
              { class: "stored-version", dataset: { version: v.version }, title: `sha256 ${v.sha256}` },
              v.version,
              canChange() && v.version !== pkg.active_version
                ? activateButton(pkg, v.version)
                : null,
            ),
          ),
        )
      : null,
    pkg.canary ? canaryPanel(pkg) : null,
    canChange()
      ? el(
          "p",
          { class: "actions" },
          pkg.previous_version
            ? el("button", { type: "button", class: "rollback", dataset: { focus: `rollback:${pkg.name}` }, onclick: () => rollback(pkg) }, `Roll back to ${pkg.previous_version}`)
            : null,
          el("button", { type: "button", class: "undeploy danger", dataset: { focus: `undeploy:${pkg.name}` }, onclick: () => undeploy(pkg) }, "Undeploy"),
        )
      : null,
  );
}

function canaryPanel(pkg) {
  const canary = pkg.canary;
  const analysis = canary.analysis;
  const focus = (what) => ({ focus: `${what}:${pkg.name}` });
  return el(
    "div",
    { class: "canary", dataset: { version: canary.version } },
    el(
      "p",
      { class: "canary-summary" },
      "Canary ",
      el("strong", { class: "canary-version" }, canary.version),
      " gets ",
      el("strong", { class: "canary-weight" }, `${canary.weight_percent}%`),
      " of the users",
      canary.step
        ? [" · ", el("span", { class: "canary-step", title: canary.steps }, `step ${canary.step} of ${canary.step_count}`)]
        : null,
      canary.current_step ? ` (${canary.current_step})` : "",
      canary.key ? ` · kept by ${canary.key}` : "",
    ),
    el(
      "p",
      { class: "canary-analysis" },
      "Last analysis: ",
      analysis
        ? [
            el("span", { class: `verdict verdict-${analysis.verdict}` }, analysis.verdict),
            " — ",
            el("span", { class: "canary-reason" }, analysis.reason),
          ]
        : "analysis" in canary // absent: the canary runs on another worker, which analyses it
          ? "none yet"
          : `on ${canary.coordinator || "the worker that runs it"}`,
    ),
    canChange()
      ? el(
          "p",
          { class: "actions" },
          el("button", { type: "button", class: "canary-promote", dataset: focus("promote"), onclick: () => promoteCanary(pkg, false) }, "Promote"),
          el("button", { type: "button", class: "canary-promote-all", dataset: focus("promote-all"), onclick: () => promoteCanary(pkg, true) }, "Promote all"),
          el("button", { type: "button", class: "canary-abort danger", dataset: focus("abort"), onclick: () => abortCanary(pkg) }, "Abort"),
        )
      : null,
  );
}

function activateButton(pkg, version) {
  const focus = `activate:${pkg.name}:${version}`;
  const attrs = { type: "button", class: "activate", dataset: { focus }, onclick: () => activate(pkg, version) };
  return el("button", attrs, "Activate");
}

function versionRow(pkg, version) {
  const key = { package: pkg.name, version: version.version };
  const canActivate =
    canChange() &&
    version.version !== pkg.active_version &&
    pkg.available_versions.some((v) => v.version === version.version) &&
    !["failed", "stopping", "retired"].includes(version.state);
  return el(
    "tr",
    { class: `version state-${version.state}`, dataset: key },
    el("td", {}, version.version),
    el("td", { class: "state", dataset: key }, version.state),
    el("td", { class: "in-flight", dataset: key }, String(version.in_flight)),
    el("td", { class: "served", dataset: key }, String(version.served)),
    el("td", { class: "share", dataset: key }, el("span", { class: "bar" }), el("span", { class: "share-text" }, "—")),
    el("td", {}, el("code", { title: version.sha256 }, version.sha256.slice(0, 12))),
    el(
      "td",
      {},
      canActivate
        ? activateButton(pkg, version.version)
        : null,
      version.error ? el("span", { class: "error" }, version.error) : null,
    ),
  );
}

function renderTraffic() {
  const newest = state.traffic[state.traffic.length - 1];
  if (!newest) return;
  const oldest = state.traffic[0];
  for (const [name, versions] of Object.entries(newest.packages)) {
    const before = oldest === newest ? {} : oldest.packages[name] || {};
    // A version loaded anew starts at 0; a counter never goes back, but never trust it to.
    const served = Object.fromEntries(
      Object.entries(versions).map(([v, now]) => [v, Math.max(0, now.served - (before[v] ? before[v].served : 0))]),
    );
    const total = Object.values(served).reduce((a, b) => a + b, 0);
    for (const [version, now] of Object.entries(versions)) {
      const selector = (cls) => `td.${cls}[data-package="${CSS.escape(name)}"][data-version="${CSS.escape(version)}"]`;
      const cell = (cls) => document.querySelector(selector(cls));
      if (cell("in-flight")) cell("in-flight").textContent = String(now.in_flight);
      if (cell("served")) cell("served").textContent = String(now.served);
      if (cell("state")) cell("state").textContent = now.state;
      const share = cell("share");
      if (!share) continue;
      const fraction = total > 0 && oldest !== newest ? served[version] / total : null;
      share.querySelector(".share-text").textContent = fraction === null ? "idle" : `${Math.round(fraction * 100)}%`;
      share.querySelector(".bar").style.width = `${fraction === null ? 0 : Math.round(fraction * 60)}px`;
    }
  }
}

function renderWorkers(cluster) {
  if (cluster instanceof Error) {
    $("store").textContent = `Cannot read the workers: ${cluster.message}`;
    $("workers").tBodies[0].replaceChildren();
    return;
  }
  $("store").textContent = `store ${cluster.store} · generation ${cluster.generation} · this page is served by ${cluster.worker}`;
  const rows = cluster.hosts.flatMap((host) =>
    host.workers.map((worker) =>
      el(
        "tr",
        { class: "worker", dataset: { worker: worker.id } },
        el("td", {}, host.host),
        el("td", {}, worker.id),
        el("td", {}, `${worker.heartbeat_age.toFixed(1)} s ago`),
        el("td", { class: "serving" }, Object.entries(worker.serving).map(([name, version]) => `${name} ${version}`).join(", ") || "nothing"),
        el("td", { class: worker.lagging.length ? "error" : "" }, worker.lagging.join(", ") || "—"),
      ),
    ),
  );
  $("workers").tBodies[0].replaceChildren(...rows);
}

function renderDeployments() {
  const records = [...state.deployments.values()]
    .sort((a, b) => b.started_at - a.started_at)
    .slice(0, SHOWN_DEPLOYMENTS);
  const rows = [];
  for (const record of records) {
    const open = state.expanded.has(record.id);
    rows.push(
      el(
        "tr",
        {
          class: "deployment",
          dataset: { id: record.id },
          onclick: () => {
            if (open) state.expanded.delete(record.id);
            else state.expanded.add(record.id);
            renderDeployments();
          },
        },
        el(
          "td",
          {},
          el(
            "button",
            {
              type: "button",
              class: "expand",
              "aria-expanded": String(open),
              "aria-label": `steps of the ${record.operation} of ${record.package || "a package"}`,
              dataset: { focus: `expand:${record.id}` },
            },
            open ? "▾" : "▸",
          ),
          " ",
          clock(record.started_at),
        ),
        el("td", {}, record.operation),
        el("td", {}, record.package || "…"),
        el("td", {}, record.from_version || ""),
        el("td", {}, record.to_version || ""),
        el("td", { class: `outcome outcome-${record.outcome}` }, record.outcome.replaceAll("_", " ")),
        el("td", {}, duration(record.duration_ms)),
      ),
    );
    if (open) {
      rows.push(
        el(
          "tr",
          { class: "steps", dataset: { for: record.id } },
          el(
            "td",
            { colspan: 7 },
            record.error ? el("p", { class: "error" }, `${record.error_step || "error"}: ${record.error}`) : null,
            el("ol", {}, stepRows(record.id).map(stepItem)),
          ),
        ),
      );
    }
  }
  keepingFocus(() => $("deployments").tBodies[0].replaceChildren(...rows));
}

// -- wiring ---------------------------------------------------------------------------------

function wire() {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut(null));
  $("archive").addEventListener("change", () => {
    if ($("archive").files.length) deploy($("archive").files[0]);
  });
  // A file dropped beside the drop zone must not make the browser open the archive.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    if (canChange() && event.dataTransfer.files.length) deploy(event.dataTransfer.files[0]);
  });
  if (state.token) signIn(state.token);
  else showSignIn(null);
}

wire();
