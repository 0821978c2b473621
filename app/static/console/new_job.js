// New job: turn the generated form into a TrainParams JSON body, POST /train, show 422s beside their fields.
"use strict";
(function () {
  const { api, errorMessage, url, pickDataset } = window.Console;
  const form = document.getElementById("new-job");
  const formError = document.getElementById("form-error");
  const submit = document.getElementById("submit-job");

  function bodyOf() {
    const body = {};
    for (const field of form.querySelectorAll(".field")) {
      const name = field.dataset.field;
      const input = document.getElementById("f-" + name);
      const kind = field.dataset.kind;
      if (kind === "boolean") { body[name] = input.checked; continue; }
      const raw = input.value.trim();
      if (raw === "") {
        if (field.dataset.optional === "yes") continue;
        body[name] = raw;  // the server names the field as missing a value
        continue;
      }
      // Numbers the browser cannot parse go as text, so the server's rule is what the user sees.
      body[name] = kind === "integer" || kind === "number" ? (Number.isFinite(Number(raw)) ? Number(raw) : raw) : raw;
    }
    return body;
  }

  function clearErrors() {
    formError.textContent = "";
    form.querySelectorAll(".field").forEach((field) => {
      document.getElementById("error-" + field.dataset.field).textContent = "";
      document.getElementById("f-" + field.dataset.field).removeAttribute("aria-invalid");
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    submit.disabled = true;
    const result = await api("/train", { method: "POST", json: bodyOf() });
    submit.disabled = false;
    if (result.status === 202) {
      window.location.assign(url("/console/jobs/" + encodeURIComponent(result.body.job_id)));
      return;
    }
    const fields = (result.body && result.body.error && result.body.error.fields) || {};
    let first = null;
    for (const [name, message] of Object.entries(fields)) {
      const target = document.getElementById("error-" + name.split(".")[0]);
      if (!target) continue;
      target.textContent = message;
      const input = document.getElementById("f-" + name.split(".")[0]);
      input.setAttribute("aria-invalid", "true");
      first = first || input;
    }
    formError.textContent = errorMessage(result);
    if (first) first.focus();
  });

  pickDataset(form.querySelector("[data-picks=dataset]"), [...form.querySelectorAll("[data-picks=column]")]);
})();
