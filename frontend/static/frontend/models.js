// The Models page: while a rollout is active, reload its section every few seconds (each step's status and figures).
(function () {
  "use strict";
  const box = document.getElementById("rollouts");
  if (!box) return;
  const PERIOD_MS = 3000;
  async function reload() {
    if (box.querySelector("[data-active='1']") === null) return; // nothing running: stop polling
    try {
      const response = await fetch(box.dataset.url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (response.ok) box.innerHTML = await response.text();
    } catch (err) {
      // a missed reload is retried on the next tick
    }
    setTimeout(reload, PERIOD_MS);
  }
  setTimeout(reload, PERIOD_MS);
})();
