// Jobs page: the server rendered the first page; this keeps it current (new jobs, progress, results).
"use strict";
(function () {
  const { api, el, percent, when, statusBadge, url, every } = window.Console;
  const body = document.getElementById("jobs-body");
  const live = document.getElementById("jobs-live");
  const POLL_MS = 3000;
  // The filter applies with its button (or Enter), not on change: arrowing through a select must not navigate.

  function row(job) {
    const p = job.params;
    const params = "lr " + p.lr + " · bs " + p.batch_size + " · ep " + p.epochs + " · len " + p.max_length +
      (p.train_limit ? " · n " + p.train_limit : "");
    const learned = job.learned_nothing
      ? el("span", { class: "flag", title: "val accuracy not 1 point above the majority baseline (" + percent(job.majority_baseline) + ")", text: "learned nothing" })
      : job.accuracy !== null && job.accuracy !== undefined ? "yes" : "";
    return el("tr", { "data-job-id": job.job_id, "data-status": job.status },
      el("td", {}, el("a", { href: url("/console/jobs/" + encodeURIComponent(job.job_id)), class: "mono", text: job.job_id.slice(0, 8) })),
      el("td", {}, statusBadge(job.status)),
      el("td", { text: job.model }),
      el("td", { class: "params", text: params }),
      el("td", {}, el("progress", { max: 1, value: job.progress, "aria-label": "progress of job " + job.job_id.slice(0, 8) }, percent(job.progress))),
      el("td", { text: percent(job.dev_accuracy) }),
      el("td", { text: percent(job.accuracy) }),
      el("td", {}, learned),
      el("td", {}, el("time", { datetime: job.created_at, text: when(job.created_at) })));
  }

  function pager(listing) {
    const query = new URLSearchParams(window.location.search);
    const link = (page, rel, text) => {
      query.set("page", page);
      return el("a", { rel, href: "?" + query.toString(), text });
    };
    document.getElementById("jobs-pager").replaceChildren(
      listing.page > 1 ? link(listing.page - 1, "prev", "← Newer") : "",
      el("span", { text: "Page " + listing.page + " of " + listing.pages + " · " + listing.total + " jobs" }),
      listing.page < listing.pages ? link(listing.page + 1, "next", "Older →") : "");
  }

  async function refresh() {
    const result = await api("/console/jobs" + window.location.search);
    if (!result.ok) { live.textContent = "live updates paused: " + Console.errorMessage(result); return true; }
    const rows = result.body.jobs.map(row);
    if (rows.length) body.replaceChildren(...rows);
    else body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 9, text: "No jobs here yet." })));
    pager(result.body);
    live.textContent = "updated " + new Date().toLocaleTimeString();
    return true;
  }

  // Without job data in the page (reads need the token), fetch at once instead of at the first tick.
  if (document.getElementById("jobs-table").dataset.rendered === "no") refresh();
  every(POLL_MS, refresh);
})();
