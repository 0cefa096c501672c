// Draws the dashboard's charts from the series the page embeds (#dashboard-series).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("dashboard-series").textContent);
  var colours = { blue: "#1565c0", red: "#c62828", green: "#2e7d32", orange: "#ef6c00", grey: "#6d6d6d", purple: "#6a1b9a" };
  function line(label, values, colour, extra) {
    return Object.assign({ label: label, data: values, borderColor: colour, backgroundColor: colour,
      pointRadius: 0, borderWidth: 1.5, spanGaps: false, tension: 0.2 }, extra || {});
  }
  function chart(id, type, datasets, options) {
    var canvas = document.getElementById(id);
    if (!canvas) return;
    new Chart(canvas, {
      type: type,
      data: { labels: data.labels, datasets: datasets },
      options: Object.assign({
        animation: false, responsive: true, maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: { x: { ticks: { maxTicksLimit: 12, autoSkip: true } }, y: { beginAtZero: true } },
        plugins: { legend: { position: "bottom" } }
      }, options || {})
    });
  }
  chart("chart-runs", "bar", [
    line("runs", data.runs, colours.blue),
    line("errors", data.errors, colours.red)
  ]);
  chart("chart-ttft", "line", [
    line("p50", data.ttft_p50_ms, colours.green),
    line("p95", data.ttft_p95_ms, colours.orange)
  ]);
  chart("chart-tokens", "bar", [
    line("prompt", data.prompt_tokens, colours.purple, { stack: "t" }),
    line("completion", data.completion_tokens, colours.blue, { stack: "t" })
  ], { scales: { x: { stacked: true, ticks: { maxTicksLimit: 12 } }, y: { stacked: true, beginAtZero: true } } });
  chart("chart-queue", "line", [
    line("depth (tasks)", data.queue_depth, colours.grey, { yAxisID: "y" }),
    line("wait p50 (ms)", data.queue_wait_p50_ms, colours.green, { yAxisID: "y1" }),
    line("wait p95 (ms)", data.queue_wait_p95_ms, colours.orange, { yAxisID: "y1" })
  ], { scales: { x: { ticks: { maxTicksLimit: 12 } }, y: { beginAtZero: true, position: "left" },
                 y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } } } });
  var busy = [line("runs in flight", data.runs_in_flight, colours.blue)];
  if (data.workers_live.some(function (v) { return v !== null; })) {
    busy.push(line("live workers", data.workers_live, colours.green));
  }
  chart("chart-busy", "line", busy);
})();
