// The dataset and column dropdowns of the new-job and sweep forms: the datasets from GET /datasets after the
// built-in one, and each column <select> (named after its field: text_column, …) filled with the chosen dataset's
// columns. The empty choice keeps the mapping the dataset was uploaded with; boolq's mapping is fixed.
"use strict";
(function () {
  const { api, el } = window.Console;

  async function pickDataset(datasetSelect, columnSelects) {
    const result = await api("/datasets");
    const records = new Map(result.ok ? result.body.datasets.map((d) => [d.id, d]) : []);
    for (const d of records.values()) {
      datasetSelect.append(el("option", { value: d.id, text: d.filename + " · " + d.id }));
    }
    const wanted = new URLSearchParams(window.location.search).get("dataset");  // "Train on it" links here
    if (records.has(wanted)) datasetSelect.value = wanted;

    function fillColumns() {
      const record = records.get(datasetSelect.value);
      for (const select of columnSelects) {
        const own = record ? record.mapping[select.name] : null;
        select.replaceChildren(
          el("option", { value: "", text: record ? "the dataset's own: " + (own || "none") : "the dataset's own" }),
          ...(record ? record.columns : []).map((column) => el("option", { value: column, text: column })));
        select.disabled = !record;
      }
    }
    datasetSelect.addEventListener("change", fillColumns);
    fillColumns();
  }

  window.Console.pickDataset = pickDataset;
})();
