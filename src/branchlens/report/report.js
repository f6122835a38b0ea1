// Gallery filters: hide, show and reorder server-rendered cards (no HTML is built here).
(function () {
  "use strict";
  var grid = document.getElementById("cards");
  if (!grid) { return; }
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
  var el = function (id) { return document.getElementById(id); };
  var f = { layer: el("f-layer"), branch: el("f-branch"), cat: el("f-cat"), sort: el("f-sort"),
            search: el("f-search") };

  // "123", "#123", "mixed4c:123", "mixed4c #123", "mixed4c/123"; other text matches layers.
  function searchMatcher(text) {
    var q = text.trim();
    if (!q) { return function () { return true; }; }
    var m = /^(?:([A-Za-z0-9_]+)\s*[:\/#\s-]\s*)?#?(\d+)$/.exec(q);
    if (m) {
      var id = m[2].replace(/^0+(?=\d)/, ""), layer = m[1];
      return function (c) {
        return c.dataset.latent === id && (!layer || c.dataset.layer === layer);
      };
    }
    var low = q.toLowerCase();
    return function (c) { return c.dataset.layer.toLowerCase().indexOf(low) >= 0; };
  }

  var bySpec = function (a, b) { return parseFloat(b.dataset.spec) - parseFloat(a.dataset.spec); };
  var comparators = {
    "img-spec": function (a, b) { return (b.dataset.img - a.dataset.img) || bySpec(a, b); },
    spec: bySpec,
    rate: function (a, b) { return parseFloat(b.dataset.rate) - parseFloat(a.dataset.rate); },
    "rate-asc": function (a, b) { return parseFloat(a.dataset.rate) - parseFloat(b.dataset.rate); },
    id: function (a, b) { return cards.indexOf(a) - cards.indexOf(b); }
  };

  function apply() {
    var match = searchMatcher(f.search.value);
    var shown = 0;
    cards.forEach(function (c) {
      var ok = (!f.layer.value || c.dataset.layer === f.layer.value) &&
               (!f.branch.value || c.dataset.branch === f.branch.value) &&
               (!f.cat.value || c.dataset.category === f.cat.value) && match(c);
      c.hidden = !ok;
      if (ok) { shown += 1; }
    });
    var cmp = comparators[f.sort.value] || comparators["img-spec"];
    cards.slice().sort(function (a, b) {
      return cmp(a, b) || cards.indexOf(a) - cards.indexOf(b);
    }).forEach(function (c) { grid.appendChild(c); });
    el("f-count").textContent = shown + " of " + cards.length + " cards";
    el("f-empty").hidden = shown > 0;
  }

  [f.layer, f.branch, f.cat, f.sort].forEach(function (s) { s.addEventListener("change", apply); });
  f.search.addEventListener("input", apply);
  // An upstream link to a card hidden by the filters clears them first.
  grid.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a[data-goto]") : null;
    if (!a) { return; }
    var target = document.getElementById("card-" + a.dataset.goto);
    if (target && target.hidden) {
      f.layer.value = f.branch.value = f.cat.value = f.search.value = "";
      apply();
    }
  });
  apply();
}());
