// The SLO page's charts: Chart.js (vendored) over the hourly series the view embeds as JSON (#slo-series).
"use strict";

(function () {
  const source = document.getElementById("slo-series");
  if (!source || typeof Chart === "undefined") return;
  const series = JSON.parse(source.textContent);
  const palette = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c"];
  const colour = (i) => palette[i % palette.length];

  function datasets(named, options) {
    return Object.entries(named).map(([label, data], i) => ({
      label,
      data,
      borderColor: colour(i),
      backgroundColor: colour(i),
      spanGaps: true,
      pointRadius: 0,
      borderWidth: 2,
      ...(options || {}),
    }));
  }

  function chart(id, type, sets, scales) {
    const canvas = document.getElementById(id);
    if (!canvas) return;
    new Chart(canvas, {
      type,
      data: { labels: series.labels, datasets: sets },
      options: {
        animation: false,
        responsive: true,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        scales: { x: { ticks: { maxTicksLimit: 8 } }, ...scales },
      },
    });
  }

  const share = { y: { min: 0, max: 1 } };
  chart("chart-attainment", "line", datasets(series.attainment), { y: { max: 1 } });
  // log scale: TTFT and inter-token latencies sit orders of magnitude under end-to-end ones
  chart("chart-latency", "line", datasets(series.latency), { y: { type: "logarithmic", title: { display: true, text: "ms (log)" } } });
  chart("chart-route-mix", "bar", datasets(series.route_mix, { borderWidth: 0 }).map((set) => ({
    ...set,
    stack: set.label.endsWith("_cache") ? "source" : "tier",
  })), { x: { stacked: true, ticks: { maxTicksLimit: 8 } }, y: { stacked: true, beginAtZero: true } });
  chart("chart-tier-health", "line", datasets(series.tier_failure_rate), share);
  chart("chart-acceptance", "line", datasets({ acceptance: series.acceptance }), {
    y: { min: 0, max: 1, title: { display: true, text: "accepted / drafted" } },
  });
  const queue = datasets(series.queue);
  queue[1].yAxisID = "share";
  queue[2].yAxisID = "ms";
  chart("chart-queue", "line", queue, {
    y: { beginAtZero: true, title: { display: true, text: "requests waiting" } },
    share: { min: 0, max: 1, display: false },
    ms: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: "ms" } },
  });
})();
