// Allot review page: plots (plotly, served locally), sortable and filterable tables. No framework.
(function () {
  "use strict";

  function drawPlots() {
    if (typeof Plotly === "undefined") return;
    document.querySelectorAll("[data-plot]").forEach(function (el) {
      var source = document.getElementById(el.getAttribute("data-plot"));
      if (!source) return;
      var figure = JSON.parse(source.textContent);
      Plotly.newPlot(el, figure.data, figure.layout, { displaylogo: false, responsive: true });
    });
  }

  function cellValue(row, index, type) {
    var cell = row.cells[index];
    if (!cell) return type === "num" ? -Infinity : "";
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
    if (type === "num") {
      var n = parseFloat(raw);
      return isNaN(n) ? -Infinity : n;
    }
    return raw.toLowerCase();
  }

  function makeSortable(table) {
    var headers = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(headers, function (th, index) {
      th.addEventListener("click", function () {
        var type = th.getAttribute("data-type") || "text";
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a, index, type), y = cellValue(b, index, type);
          var order = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }

  function applyFilters(tableId) {
    var table = document.getElementById(tableId);
    if (!table) return;
    var text = document.querySelector('[data-filter-table="' + tableId + '"]');
    var state = document.querySelector('[data-state-filter="' + tableId + '"]');
    var query = text ? text.value.trim().toLowerCase() : "";
    var wanted = state ? state.value : "";
    var shown = 0, rows = table.tBodies[0].rows;
    Array.prototype.forEach.call(rows, function (row) {
      var ok = (!query || row.textContent.toLowerCase().indexOf(query) >= 0) &&
               (!wanted || row.getAttribute("data-state") === wanted);
      row.style.display = ok ? "" : "none";
      if (ok) shown += 1;
    });
    var count = document.querySelector('[data-count-for="' + tableId + '"]');
    if (count) count.textContent = shown + " of " + rows.length + " shown";
  }

  function wireFilters() {
    var ids = {};
    document.querySelectorAll("[data-filter-table], [data-state-filter]").forEach(function (el) {
      var id = el.getAttribute("data-filter-table") || el.getAttribute("data-state-filter");
      ids[id] = true;
      el.addEventListener(el.tagName === "SELECT" ? "change" : "input", function () { applyFilters(id); });
    });
    Object.keys(ids).forEach(applyFilters);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(makeSortable);
    wireFilters();
    drawPlots();
  });
})();
