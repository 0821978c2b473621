// Job page: live curves and progress (polling every 1.5 s until the job ends), final metrics, confusion
// matrix, cancel, and the val predictions (paged, "wrong only").
"use strict";
(function () {
  const { api, el, percent, errorMessage, FINAL, every } = window.Console;
  const jobId = document.getElementById("job").dataset.jobId;
  const path = "/jobs/" + encodeURIComponent(jobId);
  const statusBadge = document.getElementById("job-status");
  const message = document.getElementById("job-message");
  const cancelButton = document.getElementById("cancel-job");
  const POLL_MS = 1500;
  const PER_PAGE = 20;
  let predictionsPage = 1;
  let predictionsShown = false;
  let labels = [];  // label names by id, from the job's metrics

  const INTEGER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
  const epochs = Number(document.getElementById("job").dataset.epochs) || 1;

  // Steps and epochs are whole numbers: ticks at integers only; the epoch axis spans every epoch of the run.
  function chart(id, label, xLabel, yRange, xRange) {
    const box = document.getElementById(id);
    const options = {
      width: Math.max(box.clientWidth, 240),
      height: 220,
      scales: { x: Object.assign({ time: false }, xRange ? { range: xRange } : {}), y: yRange ? { range: yRange } : {} },
      axes: [{ label: xLabel, incrs: INTEGER_STEPS }, {}],
      series: [{ label: xLabel }, { label, stroke: "#2563eb", width: 2, points: { show: true, size: 6 } }],
      legend: { show: false },  // the caption under each chart says the same in words
    };
    const plot = new uPlot(options, [[], []], box);
    new ResizeObserver(() => plot.setSize({ width: Math.max(box.clientWidth, 240), height: 220 })).observe(box);
    return plot;
  }
  const lossPlot = chart("loss-chart", "train loss", "step");
  const devPlot = chart("dev-chart", "dev accuracy", "epoch", [0, 1], () => [0.5, epochs + 0.5]);

  function drawCurves(curves) {
    const loss = curves.loss || [];
    const dev = curves.dev_accuracy || [];
    lossPlot.setData([loss.map((p) => p[0]), loss.map((p) => p[1])]);
    devPlot.setData([dev.map((p) => p[0]), dev.map((p) => p[1])]);
    const lossBox = document.getElementById("loss-chart");
    lossBox.dataset.points = loss.length;
    document.getElementById("dev-chart").dataset.points = dev.length;
    document.getElementById("loss-caption").textContent = "Train loss per step: " + loss.length + " points" +
      (loss.length ? ", last " + loss[loss.length - 1][1].toFixed(4) : "");
    document.getElementById("dev-caption").textContent = "Dev accuracy per epoch: " +
      (dev.length ? dev.map((p) => "epoch " + p[0] + " " + percent(p[1])).join(", ") : "none yet");
  }

  function drawJob(job) {
    document.getElementById("params-body").replaceChildren(...Object.entries(job.params || {}).map(([k, v]) =>
      el("tr", {}, el("th", { scope: "row", text: k }), el("td", { text: typeof v === "string" ? v : JSON.stringify(v) }))));
    statusBadge.textContent = job.status;
    statusBadge.className = "status status-" + job.status;
    cancelButton.hidden = FINAL.has(job.status);
    const progress = job.progress || {};
    const fraction = job.status === "succeeded" ? 1 : progress.total_steps ? progress.step / progress.total_steps : 0;
    document.getElementById("job-progress").value = fraction;
    document.getElementById("job-progress-text").textContent = progress.total_steps
      ? "epoch " + progress.epoch + "/" + progress.epochs + ", step " + progress.step + "/" + progress.total_steps +
        (progress.examples_per_s ? ", " + progress.examples_per_s.toFixed(1) + " examples/s" : "")
      : job.status;
    const waiting = document.getElementById("job-waiting");
    waiting.hidden = !job.waiting;
    waiting.textContent = job.waiting || "";
    const warning = document.getElementById("job-warning");
    warning.hidden = !(job.result && job.result.warning);
    if (job.result && job.result.warning) warning.textContent = job.result.warning;
    const error = document.getElementById("job-error");
    error.hidden = !job.error;
    if (job.error) error.textContent = job.error.type + ": " + job.error.message;
    if (job.status === "succeeded" && job.result) drawResult(job.result);
  }

  function drawResult(result) {
    const m = result.metrics || {};
    const rows = [
      ["val accuracy", percent(result.accuracy)],
      ["majority baseline", percent(m.majority_baseline)],
      ["learned", m.learned === false ? "nothing: not 1 point above the majority baseline" : "yes"],
      ["dev accuracy (kept epoch)", percent(result.dev_accuracy)],
      ["macro-F1", percent(m.macro_f1)],
      ["val examples", result.n_eval],
      ["kept epoch", m.kept_epoch],
      ["train examples/s", m.train_examples_per_s === undefined ? "–" : Number(m.train_examples_per_s).toFixed(1)],
    ];
    document.getElementById("metrics-body").replaceChildren(...rows.map(([k, v]) =>
      el("tr", {}, el("th", { scope: "row", text: k }), el("td", { text: v === undefined || v === null ? "–" : v }))));
    // Runs from before label names were recorded are all BoolQ's.
    labels = m.label_names || ["no", "yes"];
    if (m.confusion_matrix) drawConfusion(m.confusion_matrix, labels);
    if (m.per_class) {
      document.getElementById("per-class-body").replaceChildren(...m.per_class.map((c) => el("tr", {},
        el("th", { scope: "row", text: c.label }), el("td", { text: percent(c.precision) }),
        el("td", { text: percent(c.recall) }), el("td", { text: percent(c.f1) }), el("td", { text: c.support }))));
    }
    if (!predictionsShown) {
      predictionsShown = true;
      document.getElementById("predictions").hidden = false;
      loadPredictions();
    }
  }

  // Rows are the true labels, columns the predictions; the diagonal is right.
  function drawConfusion(matrix, names) {
    document.getElementById("confusion-head").replaceChildren(el("tr", {}, el("td", {}),
      ...names.map((name) => el("th", { scope: "col", text: "predicted " + name }))));
    document.getElementById("confusion-body").replaceChildren(...matrix.map((counts, i) =>
      el("tr", {}, el("th", { scope: "row", text: "label " + names[i] }),
        ...counts.map((n, j) => el("td", { class: i === j ? "right" : "wrong", text: n })))));
  }

  async function loadPredictions() {
    const wrongOnly = document.getElementById("wrong-only").checked;
    const query = "?page=" + predictionsPage + "&per_page=" + PER_PAGE + (wrongOnly ? "&wrong_only=true" : "");
    const result = await api("/console" + path + "/predictions" + query);
    const count = document.getElementById("predictions-count");
    if (!result.ok) { count.textContent = errorMessage(result); return; }
    const data = result.body;
    const name = (id) => (labels[id] === undefined ? String(id) : labels[id]);
    const score = (p) => (p.scores ? p.scores[p.prediction] : p.probability);
    document.getElementById("predictions-body").replaceChildren(...data.predictions.map((p) =>
      el("tr", { class: p.label === p.prediction ? "" : "wrong-row", "data-correct": p.label === p.prediction ? "yes" : "no" },
        el("td", { class: "mono", text: p.idx }),
        el("td", { text: p.text === null ? "–" : p.text }),
        el("td", { class: "excerpt", text: p.text_pair === null ? "–" : p.text_pair }),
        el("td", { text: name(p.label) }),
        el("td", { text: name(p.prediction) + (p.label === p.prediction ? "" : " ✗") }),
        el("td", { text: score(p).toFixed(3) }))));
    count.textContent = data.total + (wrongOnly ? " wrong predictions" : " predictions") +
      (data.texts ? "" : " (texts unavailable: the dataset's rows are not on this server)");
    document.getElementById("predictions-page").textContent = "page " + data.page + " of " + data.pages;
    document.getElementById("predictions-prev").disabled = data.page <= 1;
    document.getElementById("predictions-next").disabled = data.page >= data.pages;
  }

  document.getElementById("wrong-only").addEventListener("change", () => { predictionsPage = 1; loadPredictions(); });
  document.getElementById("predictions-prev").addEventListener("click", () => { predictionsPage -= 1; loadPredictions(); });
  document.getElementById("predictions-next").addEventListener("click", () => { predictionsPage += 1; loadPredictions(); });

  cancelButton.addEventListener("click", async () => {
    if (!window.confirm("Cancel job " + jobId + "? A running job is stopped and its work is lost.")) return;
    cancelButton.disabled = true;
    const result = await api(path + "/cancel", { method: "POST" });
    cancelButton.disabled = false;
    message.textContent = result.ok ? "" : errorMessage(result);
    if (result.body && result.body.status) drawJob(result.body);
    refresh();
  });

  async function refresh() {
    const result = await api("/console" + path + "/live");
    if (!result.ok) { message.textContent = "live updates paused: " + errorMessage(result); return true; }
    message.textContent = "";
    drawJob(result.body.job);
    drawCurves(result.body.curves);
    return !FINAL.has(result.body.job.status);
  }

  refresh().then((again) => { if (again) every(POLL_MS, refresh); });
})();
