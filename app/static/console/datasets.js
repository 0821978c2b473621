// Datasets: upload a file with its column mapping (POST /datasets, with upload progress), show one dataset's
// summary, label histogram per split and first rows (GET /datasets/<id>), list and delete the uploaded ones.
"use strict";
(function () {
  const { api, upload, el, percent, when, errorMessage, url } = window.Console;
  const form = document.getElementById("upload-form");
  const progress = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const MAPPING = ["text_column", "text_pair_column", "label_column"];
  let shown = null;  // id of the dataset on display

  function size(bytes) {
    if (bytes < 1024) return bytes + " B";
    return bytes < 1024 * 1024 ? (bytes / 1024).toFixed(1) + " kB" : (bytes / 1024 / 1024).toFixed(1) + " MB";
  }

  function uploadedAt(d) { return when(new Date(d.created_at * 1000).toISOString()); }

  function cell(value) {
    return el("td", { text: value === null || value === undefined ? "–" : typeof value === "string" ? value : JSON.stringify(value) });
  }

  async function loadList() {
    const result = await api("/datasets");
    const body = document.getElementById("datasets-body");
    if (!result.ok) { document.getElementById("datasets-error").textContent = errorMessage(result); return; }
    const datasets = result.body.datasets;
    if (!datasets.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 7, text: "No datasets yet: upload one above." }))); return; }
    body.replaceChildren(...datasets.map((d) => el("tr", { "data-dataset-id": d.id },
      el("td", {}, el("a", { href: "#" + d.id, text: d.filename, onclick: () => show(d.id) })),
      el("td", { class: "mono", text: d.id }),
      el("td", { text: d.rows.train + " / " + d.rows.val }),
      el("td", { text: d.label_names.length }),
      el("td", { text: percent(d.majority_baseline) }),
      el("td", { text: uploadedAt(d) }),
      el("td", {}, el("button", { type: "button", class: "danger", text: "Delete", "aria-label": "Delete " + d.filename, onclick: () => remove(d) })))));
  }

  async function show(id) {
    const result = await api("/datasets/" + encodeURIComponent(id));
    if (!result.ok) { document.getElementById("datasets-error").textContent = errorMessage(result); return; }
    draw(result.body);
  }

  function draw(d) {
    shown = d.id;
    document.getElementById("dataset-detail").hidden = false;
    document.getElementById("dataset-title").textContent = d.filename;
    document.getElementById("dataset-train").href = url("/console/new?dataset=" + encodeURIComponent(d.id));
    const rows = [
      ["id", d.id],
      ["format, size", d.format + ", " + size(d.size_bytes)],
      ["columns (text / text pair / label)", MAPPING.map((k) => d.mapping[k] || "–").join(" / ")],
      ["rows (train / val)", d.rows.train + " / " + d.rows.val],
      ["classes", d.label_names.length],
      ["majority baseline (val)", percent(d.majority_baseline)],
      ["uploaded", uploadedAt(d)],
    ];
    document.getElementById("dataset-summary").replaceChildren(...rows.map(([k, v]) =>
      el("tr", {}, el("th", { scope: "row", text: k }), el("td", { text: v }))));
    // One row per label, each split's count with its share of the split.
    const splits = ["train", "val"];
    document.getElementById("histogram-body").replaceChildren(...d.label_names.map((label) =>
      el("tr", { "data-label": label }, el("th", { scope: "row", text: label }), ...splits.map((split) => {
        const n = d.label_histogram[split][label] || 0;
        const share = d.rows[split] ? n / d.rows[split] : 0;
        return el("td", { "data-split": split }, n + " (" + percent(share) + ") ",
          el("meter", { min: 0, max: 1, value: share, "aria-hidden": "true" }));
      }))));
    document.getElementById("preview-head").replaceChildren(el("tr", {}, ...d.columns.map((c) => el("th", { scope: "col", text: c }))));
    document.getElementById("preview-body").replaceChildren(...d.preview.map((row) =>
      el("tr", {}, ...d.columns.map((c) => cell(row[c])))));
  }

  async function remove(d) {
    if (!window.confirm("Delete dataset " + d.filename + " (" + d.id + ")?")) return;
    const result = await api("/datasets/" + encodeURIComponent(d.id), { method: "DELETE" });
    document.getElementById("datasets-error").textContent = result.ok ? "" : errorMessage(result);
    if (result.ok && shown === d.id) document.getElementById("dataset-detail").hidden = true;
    loadList();
  }

  function clearErrors() {
    document.getElementById("upload-error").textContent = "";
    for (const name of ["file", ...MAPPING]) {
      document.getElementById("error-" + name).textContent = "";
      document.getElementById("upload-" + name).removeAttribute("aria-invalid");
    }
  }

  function showErrors(result) {
    document.getElementById("upload-error").textContent = errorMessage(result);
    const fields = (result.body && result.body.error && result.body.error.fields) || {};
    for (const [name, message] of Object.entries(fields)) {
      const target = document.getElementById("error-" + name);
      if (!target) continue;
      target.textContent = message;
      document.getElementById("upload-" + name).setAttribute("aria-invalid", "true");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const file = document.getElementById("upload-file").files[0];
    if (!file) { showErrors({ body: { error: { message: "choose a file to upload", fields: { file: "no file chosen" } } } }); return; }
    const query = new URLSearchParams();
    for (const name of MAPPING) {
      const value = document.getElementById("upload-" + name).value.trim();
      if (value) query.set(name, value);
    }
    const body = new FormData();
    body.append("file", file);
    const button = document.getElementById("upload-submit");
    button.disabled = true;
    progress.hidden = false;
    progress.value = 0;
    const result = await upload("/datasets?" + query, body, (sent, total) => {
      progress.value = total ? sent / total : 0;
      status.textContent = sent < total ? size(sent) + " of " + size(total) + " sent" : "sent; the server is checking the file…";
    });
    button.disabled = false;
    progress.hidden = true;
    if (!result.ok) { status.textContent = ""; showErrors(result); return; }
    status.textContent = result.status === 201 ? "Stored as " + result.body.id + "." : "Already stored (the same file and columns): " + result.body.id + ".";
    draw(result.body);
    window.history.replaceState(null, "", "#" + result.body.id);
    loadList();
  });

  loadList();
  const fromHash = decodeURIComponent(window.location.hash.slice(1));
  if (fromHash) show(fromHash);
})();
