// evserver admin: refresh the live parts of a page from the JSON API every 3 s.
// Containers name their source with data-live-src; inside them,
// data-live-key (text, or a cell of data-live-format), data-live-list (table
// rows) and data-live-items (list items) are filled from that JSON.  Text
// and cloned <template>s only: never innerHTML.
"use strict";

(function () {
  var PERIOD_MS = 3000;

  function get(data, path) {
    return path.split(".").reduce(function (v, k) {
      return v === null || v === undefined ? undefined : v[k];
    }, data);
  }

  function humanBytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var v = Number(n) || 0;
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(v) < 1024 || i === units.length - 1) {
        if (i === 0) return Math.trunc(v) + " B";
        return v.toFixed(1).replace(/\.0$/, "") + " " + units[i];
      }
      v /= 1024;
    }
  }

  function element(tag, className, text) {
    var el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function cell(value, format) {
    if (format === "ms") {
      return document.createTextNode(
        value === null || value === undefined ? "\u2014" : Number(value).toFixed(1) + " ms");
    }
    if (format === "url") {
      if (typeof value !== "string" || value.indexOf("https://") !== 0) {
        return document.createTextNode("\u2014");
      }
      var a = element("a", null, value.slice("https://".length).replace(/\/$/, ""));
      a.href = value;
      return a;
    }
    if (format === "mbps") {
      return document.createTextNode(
        value === null || value === undefined ? "\u2014" : Number(value).toFixed(1) + " Mbit/s");
    }
    if (format === "bytes") {
      return document.createTextNode(
        value === null || value === undefined ? "\u2014" : humanBytes(value));
    }
    if (format === "list") {
      return document.createTextNode(value && value.length ? value.join(", ") : "\u2014");
    }
    if (format === "yesno") return document.createTextNode(value ? "yes" : "no");
    if (format === "state") {
      var span = document.createElement("span");
      span.className = "badge state-" + String(value).replace(/[^a-z]/g, "");
      span.textContent = String(value);
      return span;
    }
    if (value === null || value === undefined || value === "") {
      return document.createTextNode("\u2014");
    }
    return document.createTextNode(String(value));
  }

  function fillLink(template, row) {
    return template.replace(/\{([a-z_]+)\}/g, function (_, key) {
      return encodeURIComponent(String(row[key]));
    });
  }

  function fillText(template, row) {
    return template.replace(/\{([a-z_]+)\}/g, function (_, key) { return String(row[key]); });
  }

  // An "action" cell: the <template> named by the column, its {key}
  // placeholders (in form actions and confirmations) filled from the row.
  function action(th, row) {
    var template = document.getElementById(th.dataset.template);
    if (!template || !get(row, th.dataset.key)) {
      return element("span", "hint", th.dataset.otherwise || "");
    }
    var fragment = template.content.cloneNode(true);
    fragment.querySelectorAll("form").forEach(function (form) {
      form.setAttribute("action", fillLink(form.getAttribute("action"), row));
      if (form.dataset.confirm) form.dataset.confirm = fillText(form.dataset.confirm, row);
    });
    return fragment;
  }

  function updateTable(table, rows) {
    if (!Array.isArray(rows)) rows = rows ? [rows] : [];
    var heads = table.querySelectorAll("thead th");
    var body = table.querySelector("tbody");
    var fresh = document.createElement("tbody");
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      heads.forEach(function (th) {
        var td = document.createElement("td");
        if (th.classList.contains("num")) td.className = "num";
        var content = th.dataset.format === "action" ? action(th, row)
          : cell(get(row, th.dataset.key), th.dataset.format);
        if (th.dataset.link) {
          var a = document.createElement("a");
          a.href = fillLink(th.dataset.link, row);
          a.appendChild(content);
          content = a;
        }
        td.appendChild(content);
        tr.appendChild(td);
      });
      fresh.appendChild(tr);
    });
    table.replaceChild(fresh, body);
    var empty = table.parentNode.querySelector("p.empty");
    if (empty) empty.hidden = rows.length > 0;
  }

  function updateItems(list, items) {
    while (list.firstChild) list.removeChild(list.firstChild);
    (items || []).forEach(function (text) {
      var li = document.createElement("li");
      li.textContent = String(text);
      list.appendChild(li);
    });
    list.hidden = !items || items.length === 0;
  }

  function owned(container, selector) {
    // Elements of this container, not of a nested container.
    return Array.prototype.filter.call(container.querySelectorAll(selector), function (el) {
      return el.parentElement.closest("[data-live-src]") === container;
    });
  }

  function apply(container, data) {
    owned(container, "[data-live-key]").forEach(function (el) {
      var v = get(data, el.dataset.liveKey);
      if (el.dataset.liveFormat) {
        while (el.firstChild) el.removeChild(el.firstChild);
        el.appendChild(cell(v === undefined ? null : v, el.dataset.liveFormat));
        return;
      }
      el.textContent = v === undefined || v === null ? "\u2014" : String(v);
    });
    owned(container, "table[data-live-list]").forEach(function (table) {
      updateTable(table, get(data, table.dataset.liveList));
    });
    owned(container, "[data-live-items]").forEach(function (list) {
      updateItems(list, get(data, list.dataset.liveItems));
    });
  }

  function showStatus(text) {
    var box = document.getElementById("live-status");
    if (!text) {
      if (box) box.remove();
      return;
    }
    if (!box) {
      box = document.createElement("div");
      box.id = "live-status";
      box.setAttribute("role", "status");
      document.body.appendChild(box);
    }
    box.textContent = text;
  }

  function refresh(containers) {
    var sources = {};
    containers.forEach(function (c) {
      (sources[c.dataset.liveSrc] = sources[c.dataset.liveSrc] || []).push(c);
    });
    Object.keys(sources).forEach(function (src) {
      fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (response.status === 401) {
            window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
            throw new Error("logged out");
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (data) {
          sources[src].forEach(function (c) {
            apply(c, data);
            c.classList.remove("stale");
          });
          showStatus(null);
        })
        .catch(function () {
          sources[src].forEach(function (c) { c.classList.add("stale"); });
          showStatus("This server is not answering: the figures shown may be out of date.");
        });
    });
  }

  // Forms with data-confirm ask first (also those live tables add later).
  function confirmForms() {
    document.addEventListener("submit", function (event) {
      var form = event.target;
      if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
        event.preventDefault();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    confirmForms();
    var containers = Array.prototype.slice.call(document.querySelectorAll("[data-live-src]"));
    if (containers.length === 0) return;
    window.setInterval(function () {
      if (!document.hidden) refresh(containers);
    }, PERIOD_MS);
  });
})();
