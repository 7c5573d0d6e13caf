// outbox dashboard: refreshes the queues table and the rate chart in place.
// Without JavaScript, the "Refresh" link reloads the page.
"use strict";
(function () {
  var every = parseInt(document.body.getAttribute("data-refresh-ms"), 10) || 5000;
  if (!document.getElementById("queues")) return;
  var ids = ["queues", "rate-chart", "updated"];
  var legend = function (doc) { return doc.querySelector("p.legend"); };
  var busy = false;
  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        ids.forEach(function (id) {
          var fresh = doc.getElementById(id), old = document.getElementById(id);
          if (fresh && old) old.replaceWith(document.importNode(fresh, true));
        });
        var fl = legend(doc), ol = legend(document);
        if (fl && ol) ol.replaceWith(document.importNode(fl, true));
        document.body.removeAttribute("data-stale");
      })
      .catch(function () {
        // Keep the last table; mark it stale (the next tick retries).
        document.body.setAttribute("data-stale", "true");
      })
      .then(function () { busy = false; });
  }
  window.setInterval(refresh, every);
})();
