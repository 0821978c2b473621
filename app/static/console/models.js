// Models: the registered versions (GET /models: {champion, models: [{version, job_id, created_at, dev_accuracy,
// val_accuracy, metrics, champion}], alias_warning}) with the champion marked, and a promote button (POST
// /models/champion, 409 asks for "force" when the version scores lower). A server without the registry answers 404:
// say so. alias_warning: MLflow's champion alias was moved outside the service (not served): shown as it is.
"use strict";
(function () {
  const { api, el, percent, when, errorMessage, url } = window.Console;
  const body = document.getElementById("models-body");
  const problem = document.getElementById("models-error");

  async function load() {
    const result = await api("/models");
    if (result.status === 404) {
      document.getElementById("models-unavailable").hidden = false;
      document.getElementById("models-ui").hidden = true;
      return;
    }
    if (!result.ok) { problem.textContent = errorMessage(result); return; }
    const warning = document.getElementById("models-alias-warning");
    warning.textContent = result.body.alias_warning || "";
    warning.hidden = !result.body.alias_warning;
    const versions = result.body.models;
    if (!versions.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 7, text: "No registered versions yet: a succeeded job registers one." })));
      return;
    }
    body.replaceChildren(...versions.map((v) => el("tr", { class: v.champion ? "best" : "", "data-version": v.version },
      el("td", { text: v.version }),
      el("td", {}, v.job_id ? el("a", { class: "mono", href: url("/console/jobs/" + encodeURIComponent(v.job_id)), text: String(v.job_id).slice(0, 8) }) : "–"),
      el("td", { text: percent(v.val_accuracy) }),
      el("td", { text: percent(v.metrics.f1) }),
      el("td", { text: percent(v.dev_accuracy) }),
      el("td", {}, el("time", { datetime: v.created_at, text: when(v.created_at) })),
      el("td", {}, v.champion
        ? el("strong", { text: "★ champion" })
        : el("button", { type: "button", class: "secondary", "aria-label": "Promote version " + v.version, text: "Promote", onclick: () => promote(v) })))));
  }

  async function promote(v) {
    problem.textContent = "";
    const json = { version: v.version };
    if (document.getElementById("promote-force").checked) json.force = true;
    const result = await api("/models/champion", { method: "POST", json });
    if (!result.ok) problem.textContent = errorMessage(result);
    load();
  }

  load();
})();
