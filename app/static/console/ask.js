// Ask: a text (and optional text pair) → POST /predict, answered with the best label and every label's score
// (top_k), with a model picker (registered versions when the server has a registry, recent succeeded jobs
// always; the default is the server's own choice).
"use strict";
(function () {
  const { api, el, errorMessage, percent } = window.Console;
  const form = document.getElementById("ask-form");
  const picker = document.getElementById("ask-model");
  const ALL_LABELS = 1000;  // /predict's top_k limit, the most labels a model has

  // Both lists load at once (the registry can be slow to open); a job that is a registered version is listed
  // once, under the versions.
  function fillPicker() {
    const versionsGroup = el("optgroup", { label: "Registered versions" });
    const jobsGroup = el("optgroup", { label: "Succeeded jobs" });
    picker.append(versionsGroup, jobsGroup);
    const listed = () => new Set([...versionsGroup.querySelectorAll("option")].map((o) => o.value));
    api("/models").then((models) => {
      if (!models.ok || !models.body) { versionsGroup.remove(); return; }
      versionsGroup.append(el("option", { value: "champion", text: "the champion" }));
      for (const v of models.body.models) {
        if (v.job_id) versionsGroup.append(el("option", { value: v.job_id, text: "version " + v.version + (v.champion ? " (champion)" : "") + " · job " + String(v.job_id).slice(0, 8) }));
      }
      const inVersions = listed();
      jobsGroup.querySelectorAll("option").forEach((o) => { if (inVersions.has(o.value)) o.remove(); });
    });
    api("/console/jobs?status=succeeded&per_page=50").then((jobs) => {
      if (!jobs.ok) return;
      const inVersions = listed();
      for (const job of jobs.body.jobs) {
        if (!inVersions.has(job.job_id)) {
          jobsGroup.append(el("option", { value: job.job_id, text: job.job_id.slice(0, 8) + " · " + job.model + " · val " + percent(job.accuracy) }));
        }
      }
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const id of ["ask-error", "error-text", "error-text_pair"]) document.getElementById(id).textContent = "";
    const body = { text: document.getElementById("ask-text").value, top_k: ALL_LABELS };
    const pair = document.getElementById("ask-text_pair").value;
    if (pair.trim()) body.text_pair = pair;
    if (picker.value) body.model = picker.value;
    const button = document.getElementById("ask-submit");
    button.disabled = true;
    const result = await api("/predict", { method: "POST", json: body });
    button.disabled = false;
    if (!result.ok) {
      const fields = (result.body && result.body.error && result.body.error.fields) || {};
      for (const [name, text] of Object.entries(fields)) {
        const target = document.getElementById("error-" + name);
        if (target) target.textContent = text;
      }
      document.getElementById("ask-error").textContent = errorMessage(result);
      return;
    }
    document.getElementById("answer").hidden = false;
    document.getElementById("answer-label").textContent = result.body.label;
    document.getElementById("answer-score").textContent = "score " + result.body.score.toFixed(3);
    document.getElementById("answer-scores-body").replaceChildren(...result.body.scores.map((s) =>
      el("tr", {}, el("th", { scope: "row", text: s.label }), el("td", { text: s.score.toFixed(3) }))));
    document.getElementById("answer-model").textContent = result.body.model;
  });

  fillPicker();
})();
