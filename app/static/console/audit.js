// Audit: the newest entries of the audit stream (GET /audit: {entries: [{time, actor, role, action, target,
// address}]}), newest first. A key that is not an admin's is answered 403: the message says so.
"use strict";
(function () {
  const { api, el, when, errorMessage } = window.Console;
  const body = document.getElementById("audit-body");
  const problem = document.getElementById("audit-error");

  async function load() {
    const result = await api("/audit?count=200");
    if (!result.ok) { problem.textContent = errorMessage(result); return; }
    const entries = result.body.entries;
    if (!entries.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 6, text: "Nothing recorded yet." })));
      return;
    }
    body.replaceChildren(...entries.map((e) => el("tr", {},
      el("td", {}, el("time", { datetime: e.time, text: when(e.time) })),
      el("td", { text: e.actor }),
      el("td", { text: e.role || "–" }),
      el("td", { text: e.action }),
      el("td", { class: "mono", text: e.target }),
      el("td", { text: e.address || "–" }))));
  }

  load();
})();
