// Refreshes the page's live part in place: the same URL, asked with X-Fragment: 1 (server-rendered, escaped HTML).
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) { return; }
  var every = parseInt(live.getAttribute("data-refresh-ms"), 10) || 2000;
  var busy = false;
  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(window.location.pathname + window.location.search, {headers: {"X-Fragment": "1"}, credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null) { live.innerHTML = html; live.removeAttribute("data-stale"); }
        else { live.setAttribute("data-stale", "1"); }
      })
      .catch(function () { live.setAttribute("data-stale", "1"); })
      .then(function () { busy = false; });
  }
  setInterval(refresh, every);
}());
