// Ask: question + passage → POST /predict, with a model picker (registered versions when the server has a
// registry, recent succeeded jobs always; the default is the server's own choice).
"use strict";
(function () {
  const { api, el, errorMessage, percent } = window.Console;
  const form = document.getElementById("ask-form");
  const picker = document.getElementById("ask-model");

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
    for (const id of ["ask-error", "error-question", "error-passage"]) document.getElementById(id).textContent = "";
    const body = {
      question: document.getElementById("ask-question").value,
      passage: document.getElementById("ask-passage").value,
    };
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
    document.getElementById("answer-text").textContent = result.body.answer ? "Yes" : "No";
    document.getElementById("answer-probability").textContent = "P(yes) = " + result.body.probability.toFixed(3);
    document.getElementById("answer-model").textContent = result.body.model;
  });

  fillPicker();
})();
