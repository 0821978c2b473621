// Shared by every console page: API calls (with the bearer token from sessionStorage), DOM building that
// never parses user strings as HTML, and number formatting. No framework, no build step.
"use strict";
(function () {
  const ROOT = document.querySelector('meta[name="api-root"]').content;
  const TOKEN_KEY = "boolq-api-token";
  const dialog = document.getElementById("token-dialog");
  const tokenInput = document.getElementById("token-input");
  let tokenWaiters = [];

  function url(path) { return ROOT + path; }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function askToken() {
    document.getElementById("token-button").hidden = false;
    tokenInput.value = token();
    if (!dialog.open) dialog.showModal();
    return new Promise((resolve) => tokenWaiters.push(resolve));
  }

  function closeToken(saved) {
    if (dialog.open) dialog.close();
    tokenWaiters.forEach((resolve) => resolve(saved));
    tokenWaiters = [];
  }

  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
    closeToken(true);
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    closeToken(false);
  });
  document.getElementById("token-cancel").addEventListener("click", () => closeToken(false));
  dialog.addEventListener("cancel", () => closeToken(false));
  document.getElementById("token-button").addEventListener("click", askToken);

  // fetch() a JSON endpoint; resolves to {status, ok, body}. A 401 asks for the token once and retries.
  async function api(path, options = {}, retried = false) {
    const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
    if (options.json !== undefined) headers["Content-Type"] = "application/json";
    if (token()) headers.Authorization = "Bearer " + token();
    let response;
    try {
      response = await fetch(url(path), {
        method: options.method || "GET",
        headers,
        body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (error) {
      return { status: 0, ok: false, body: { error: { message: "the server cannot be reached (" + error.message + ")", fields: {} } } };
    }
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (response.status === 401 && !retried && (await askToken())) return api(path, options, true);
    return { status: response.status, ok: response.ok, body };
  }

  // POST a FormData with XMLHttpRequest, which reports upload progress (fetch does not): onProgress(sent, total).
  // Resolves like api(); a 401 asks for the token once and sends the file again.
  function upload(path, form, onProgress, retried = false) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", url(path));
      xhr.setRequestHeader("Accept", "application/json");
      if (token()) xhr.setRequestHeader("Authorization", "Bearer " + token());
      xhr.upload.addEventListener("progress", (event) => onProgress(event.loaded, event.lengthComputable ? event.total : 0));
      xhr.addEventListener("error", () => resolve({ status: 0, ok: false, body: { error: { message: "the upload did not reach the server", fields: {} } } }));
      xhr.addEventListener("load", async () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
        if (xhr.status === 401 && !retried && (await askToken())) { resolve(upload(path, form, onProgress, true)); return; }
        resolve({ status: xhr.status, ok: xhr.status >= 200 && xhr.status < 300, body });
      });
      xhr.send(form);
    });
  }

  function errorMessage(result) {
    const error = result.body && result.body.error;
    return error ? error.message : "request failed with HTTP " + result.status;
  }

  // el("td", {class: "x", text: userString}, child...): text always goes in as text, never as HTML.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function percent(value) {
    return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + " %";
  }

  function when(iso) {
    return iso ? iso.slice(0, 19).replace("T", " ") : "";
  }

  function statusBadge(status) {
    return el("span", { class: "status status-" + status, text: status });
  }

  const FINAL = new Set(["succeeded", "failed", "cancelled"]);

  // Call fn every intervalMs while it returns true (skipping ticks while the tab is hidden).
  function every(intervalMs, fn) {
    let timer = null;
    async function tick() {
      if (document.hidden) { timer = setTimeout(tick, intervalMs); return; }
      let again = true;
      try { again = await fn(); } catch (error) { console.error(error); }
      if (again !== false) timer = setTimeout(tick, intervalMs);
    }
    timer = setTimeout(tick, intervalMs);
    return () => clearTimeout(timer);
  }

  window.Console = { url, api, upload, errorMessage, el, percent, when, statusBadge, FINAL, every, askToken };
})();
