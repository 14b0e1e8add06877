// The cost dashboard's charts: Chart.js (vendored) over the figures the view embeds as JSON (#cost-data).
// Amounts arrive as strings of exact decimals; charts plot them as numbers, the tables show them exactly.
"use strict";

(function () {
  const range = document.getElementById("cost-range");
  function showCustom() {
    const custom = range && range.value === "custom";
    document.querySelectorAll(".cost-custom").forEach((field) => {
      field.hidden = !custom;
      field.querySelector("input").disabled = !custom; // a preset sends no start/end
    });
  }
  if (range) {
    range.addEventListener("change", showCustom);
    showCustom();
  }

  const source = document.getElementById("cost-data");
  if (!source || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const palette = ["#2563eb", "#7c3aed", "#d97706", "#16a34a", "#0891b2", "#dc2626", "#db2777", "#65a30d", "#475569"];
  const stackColours = { edge: "#16a34a", speculative: "#2563eb", cloud: "#d97706", exact_cache: "#7c3aed", semantic_cache: "#db2777" };
  const colour = (key, i) => stackColours[key] || palette[i % palette.length];
  const money = (value) => "$" + Number(value).toFixed(6);

  function draw(canvas, config) {
    if (!canvas) return;
    new Chart(canvas, config);
    canvas.dataset.rendered = "1"; // the browser test waits on it
  }

  const common = {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: "index", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
  };

  draw(document.getElementById("chart-spend"), {
    type: "bar",
    data: {
      labels: data.labels,
      datasets: data.series.map((s, i) => ({
        label: s.label,
        data: s.data.map(Number),
        backgroundColor: colour(s.key, i),
        borderWidth: 0,
      })),
    },
    options: {
      ...common,
      plugins: { ...common.plugins, tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${money(ctx.raw)}` } } },
      scales: {
        x: { stacked: true, ticks: { maxTicksLimit: 12 } },
        y: { stacked: true, beginAtZero: true, title: { display: true, text: "$" } },
      },
    },
  });

  draw(document.getElementById("chart-tokens"), {
    type: "bar",
    data: {
      labels: data.tokens.labels,
      datasets: [
        { label: "prompt tokens", data: data.tokens.prompt, backgroundColor: "#94a3b8", borderWidth: 0 },
        { label: "completion tokens", data: data.tokens.completion, backgroundColor: "#2563eb", borderWidth: 0 },
      ],
    },
    options: { ...common, scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } },
  });

  const budgets = Object.fromEntries(data.budgets.map((b) => [String(b.id), b]));
  document.querySelectorAll("canvas.chart-burn").forEach((canvas) => {
    const b = budgets[canvas.dataset.budget];
    if (!b) return;
    const labels = b.daily.map((d) => d.bucket);
    const sets = [{ label: "spent so far", data: b.daily.map((d) => Number(d.spent)), borderColor: "#2563eb", backgroundColor: "#2563eb", pointRadius: 0 }];
    if (labels.length) {
      // the projection: from the last point to the period's end at the current rate
      const projected = labels.map((_, i) => (i === labels.length - 1 ? Number(b.daily[i].spent) : null));
      labels.push("end of period");
      projected.push(Number(b.projected));
      sets[0].data.push(null);
      sets.push({ label: "projected", data: projected, borderColor: "#d97706", borderDash: [6, 4], spanGaps: true, pointRadius: 2 });
      if (b.hard_limit !== null) {
        sets.push({ label: "hard limit", data: labels.map(() => Number(b.hard_limit)), borderColor: "#dc2626", borderWidth: 1, pointRadius: 0 });
      }
    }
    draw(canvas, {
      type: "line",
      data: { labels, datasets: sets },
      options: { ...common, plugins: { ...common.plugins, title: { display: true, text: b.label } }, scales: { y: { beginAtZero: true } } },
    });
  });
})();
