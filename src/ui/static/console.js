// chatbridge console: the little script the pages use. Everything works
// without it; it adds the overview's refresh and the playground's live
// result. Served as a file: the Content-Security-Policy allows no inline
// script.
"use strict";

document.documentElement.classList.add("has-js");

// An element with data-refresh="N" is replaced every N seconds by the
// same element of a fresh copy of the page (server-rendered and escaped).
function startRefresh(el) {
  const seconds = Number(el.dataset.refresh) || 10;
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(location.href, { credentials: "same-origin" });
      if (response.redirected && new URL(response.url).pathname === "/ui/login") {
        location.assign("/ui/login");
        return;
      }
      if (!response.ok) return;
      const fresh = new DOMParser()
        .parseFromString(await response.text(), "text/html")
        .getElementById(el.id);
      if (fresh) el.replaceChildren(...fresh.childNodes);
    } catch (_) {
      // Offline for a moment: try again next time.
    }
  }, seconds * 1000);
}

// The playground renders as you type: the form is posted with its CSRF
// token and only the results come back (X-Fragment: results).
function startPlayground(form) {
  const results = document.getElementById("results");
  const template = document.getElementById("pg-template");
  const text = document.getElementById("pg-text");
  let timer = null;
  let sent = 0;
  async function run() {
    const mine = ++sent;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { "X-Fragment": "results" },
        credentials: "same-origin",
      });
      if (mine !== sent || !response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      results.replaceChildren(...fresh.body.childNodes);
    } catch (_) {
      // The plain submit button still works.
    }
  }
  function soon() {
    clearTimeout(timer);
    timer = setTimeout(run, 300);
  }
  template.addEventListener("change", () => {
    const option = template.selectedOptions[0];
    text.value = option && option.dataset.source !== undefined ? option.dataset.source : "";
    soon();
  });
  form.addEventListener("input", (e) => {
    if (e.target !== template) soon();
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh][id]").forEach(startRefresh);
  const playground = document.getElementById("playground");
  if (playground) startPlayground(playground);
});
