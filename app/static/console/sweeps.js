// Sweeps (issue 11's API): launch (POST /sweeps), list (GET /sweeps), and one sweep's live leaderboard
// (GET /sweeps/<id>, polled until the sweep is finished or cancelled) with dev accuracy plotted against a
// searched parameter (log axis for lr/eps), the best trial highlighted. A server without sweeps answers 404: say so.
"use strict";
(function () {
  const { api, el, percent, when, errorMessage, statusBadge, url, every, pickDataset } = window.Console;
  const LOG_SCALE = new Set(["lr", "eps"]);
  const ENDED = new Set(["finished", "cancelled", "failed"]);  // a sweep's final states
  const POLL_MS = 2000;
  let current = null;   // id of the sweep shown
  let stopPolling = null;
  let plot = null;
  let shown = { trials: [], searched: [] };  // what the plot was last drawn from (for the axis picker)

  // A trial's dev accuracy: of its kept epoch when it succeeded, else the best epoch so far (running, pruned).
  function bestDev(t) {
    if (typeof t.dev_accuracy === "number") return t.dev_accuracy;
    const perEpoch = t.dev_accuracy_per_epoch || [];
    return perEpoch.length ? Math.max(...perEpoch) : null;
  }

  async function loadList() {
    const result = await api("/sweeps");
    if (result.status === 404) {
      document.getElementById("sweeps-unavailable").hidden = false;
      document.getElementById("sweeps-ui").hidden = true;
      return false;
    }
    if (!result.ok) return true;
    const sweeps = result.body.sweeps || [];
    const body = document.getElementById("sweeps-body");
    if (!sweeps.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 5, text: "No sweeps yet." }))); return true; }
    body.replaceChildren(...sweeps.map((s) => el("tr", {},
      el("td", {}, el("a", { href: "#" + encodeURIComponent(s.sweep_id), class: "mono", text: String(s.sweep_id).slice(0, 8), onclick: () => show(s.sweep_id) })),
      el("td", {}, statusBadge(s.status)),
      el("td", { text: s.trials }),
      el("td", { text: percent(s.best ? s.best.dev_accuracy : null) }),
      el("td", { text: when(s.created_at) }))));
    return true;
  }

  async function show(id) {
    current = id;
    if (stopPolling) stopPolling();
    document.getElementById("sweep-detail").hidden = false;
    const again = await refresh();
    if (again) stopPolling = every(POLL_MS, refresh);
  }

  async function refresh() {
    const id = current;
    const result = await api("/sweeps/" + encodeURIComponent(id));
    if (!result.ok || id !== current) return false;
    const sweep = result.body;
    document.getElementById("sweep-title").textContent = "Sweep " + id;
    const status = document.getElementById("sweep-status");
    status.textContent = sweep.status;
    status.className = "status status-" + sweep.status;
    const cancel = document.getElementById("sweep-cancel");
    cancel.hidden = ENDED.has(sweep.status);
    cancel.onclick = async () => { await api("/sweeps/" + encodeURIComponent(id) + "/cancel", { method: "POST" }); refresh(); };
    drawLeaderboard(sweep);
    return !ENDED.has(sweep.status);
  }

  function drawLeaderboard(sweep) {
    const trials = sweep.leaderboard || [];
    const searched = Object.keys(sweep.space || {});
    const head = el("tr", {}, el("th", { scope: "col", text: "#" }), el("th", { scope: "col", text: "Job" }),
      el("th", { scope: "col", text: "Status" }), ...searched.map((k) => el("th", { scope: "col", text: k })),
      el("th", { scope: "col", text: "Dev acc. per epoch" }), el("th", { scope: "col", text: "Val acc." }));
    document.getElementById("leaderboard-head").replaceChildren(head);
    const best = sweep.best ? sweep.best.trial : null;  // the best succeeded trial by dev accuracy (listed first)
    document.getElementById("leaderboard-body").replaceChildren(...trials.map((t, i) => el("tr",
      { class: t.trial === best ? "best" : "", "data-trial": t.trial, "data-status": t.status },
      el("td", { text: i + 1 }),
      el("td", {}, t.job_id ? el("a", { class: "mono", href: url("/console/jobs/" + encodeURIComponent(t.job_id)), text: String(t.job_id).slice(0, 8) }) : "–"),
      el("td", {}, statusBadge(t.status || "queued")),
      ...searched.map((k) => el("td", { text: (t.params || {})[k] === undefined ? "–" : t.params[k] })),
      el("td", { text: (t.dev_accuracy_per_epoch || []).length ? t.dev_accuracy_per_epoch.map(percent).join(" → ") : "–" }),
      el("td", { text: percent(t.val_accuracy) }))));
    drawPlot(trials, searched, best);
  }

  function drawPlot(trials, searched, bestTrial) {
    shown = { trials, searched, bestTrial };
    const axis = document.getElementById("sweep-axis");
    const numeric = searched.filter((k) => trials.some((t) => typeof (t.params || {})[k] === "number"));
    if (axis.options.length !== numeric.length) {
      axis.replaceChildren(...numeric.map((k) => el("option", { value: k, text: k })));
      axis.onchange = () => { plot = null; drawPlot(shown.trials, shown.searched, shown.bestTrial); };
    }
    const key = axis.value;
    const box = document.getElementById("sweep-chart");
    if (!key) { box.replaceChildren(); plot = null; box.dataset.points = 0; return; }
    const points = trials.filter((t) => typeof (t.params || {})[key] === "number" && bestDev(t) !== null)
      .map((t) => [t.params[key], bestDev(t)]).sort((a, b) => a[0] - b[0]);
    const top = trials.find((t) => t.trial === bestTrial);
    const best = top && typeof (top.params || {})[key] === "number" ? [top.params[key], bestDev(top)] : null;
    box.dataset.points = points.length;
    const data = [points.map((p) => p[0]), points.map((p) => p[1]), points.map((p) => (best && p[0] === best[0] && p[1] === best[1] ? p[1] : null))];
    document.getElementById("sweep-caption").textContent = "Best dev accuracy of each trial against " + key +
      (LOG_SCALE.has(key) ? " (log axis)" : "") + "; the best trial is the large green point.";
    if (!plot) {
      box.replaceChildren();
      plot = new uPlot({
        width: Math.max(box.clientWidth, 240), height: 240,
        scales: { x: Object.assign({ time: false }, LOG_SCALE.has(key) ? { distr: 3, log: 10 } : {}), y: { range: [0, 1] } },
        axes: [
          LOG_SCALE.has(key) ? { label: key, values: (u, ticks) => ticks.map((v) => (v === null ? "" : v.toExponential(0))) } : { label: key },
          { label: "dev accuracy" },
        ],
        legend: { show: false },  // the caption says what the points are
        series: [{ label: key },
          { label: "trial", stroke: "transparent", points: { show: true, size: 7, fill: "#2563eb", stroke: "#2563eb" } },
          { label: "best", stroke: "transparent", points: { show: true, size: 13, fill: "#1a7f37", stroke: "#1a7f37" } }],
      }, data, box);
    } else {
      plot.setData(data);
    }
  }

  document.getElementById("sweep-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = document.getElementById("sweep-error");
    error.textContent = "";
    let json;
    try { json = JSON.parse(document.getElementById("sweep-body").value); } catch (e) { error.textContent = "not valid JSON: " + e.message; return; }
    json.base = Object.assign({}, json.base, picks());
    const result = await api("/sweeps", { method: "POST", json });
    if (!result.ok) {
      const fields = (result.body && result.body.error && result.body.error.fields) || {};
      error.textContent = errorMessage(result) + Object.entries(fields).map(([k, v]) => "\n" + k + ": " + v).join("");
      return;
    }
    await loadList();
    show(result.body.sweep_id);
  });

  const datasetSelect = document.getElementById("sweep-dataset");
  const columnSelects = [...document.querySelectorAll("#sweep-form [data-picks=column]")];
  pickDataset(datasetSelect, columnSelects);

  // The dataset always, a column where one is picked (empty: the dataset's own).
  function picks() {
    const chosen = { dataset: datasetSelect.value };
    for (const select of columnSelects) if (select.value) chosen[select.name] = select.value;
    return chosen;
  }

  loadList().then((available) => {
    if (!available) return;
    every(5000, loadList);
    const fromHash = decodeURIComponent(window.location.hash.slice(1));
    if (fromHash) show(fromHash);
  });
})();
