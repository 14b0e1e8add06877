// The Batches page: while any batch runs, poll the progress endpoint every 2 s and update its row.
"use strict";

(function () {
  const table = document.getElementById("batches-table");
  if (!table) return;
  const url = table.dataset.progressUrl;
  const EVERY_MS = 2000;

  function fileLink(id, label) {
    const a = document.createElement("a");
    a.href = table.dataset.progressUrl.replace(/progress\.json$/, "files/" + encodeURIComponent(id) + "/");
    a.textContent = label;
    return a;
  }

  function update(row, b) {
    row.dataset.running = b.running ? "1" : "0";
    row.querySelector('[data-field="status"]').textContent = b.status;
    const bar = row.querySelector('[data-field="bar"]');
    bar.max = b.total;
    bar.value = b.done;
    row.querySelector('[data-field="counts"]').textContent = b.completed + " / " + b.failed + " / " + b.total;
    row.querySelector('[data-field="cost"]').textContent = b.cost;
    const files = row.querySelector('[data-field="files"]');
    files.replaceChildren(fileLink(b.input_file_id, "input"));
    for (const [id, label] of [[b.output_file_id, "output"], [b.error_file_id, "errors"]]) {
      if (id) files.append(" · ", fileLink(id, label));
    }
  }

  async function poll() {
    if (!table.querySelector('tr[data-running="1"]')) return; // nothing running: stop polling
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        const { batches } = await response.json();
        for (const b of batches) {
          const row = table.querySelector('tr[data-batch="' + CSS.escape(b.id) + '"]');
          if (row) update(row, b);
        }
      }
    } finally {
      setTimeout(poll, EVERY_MS);
    }
  }

  setTimeout(poll, EVERY_MS);
})();
