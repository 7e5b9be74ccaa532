// The connect page's only script: a show/hide control for the key and a busy state on submit.
// The page works without it.
(function () {
  "use strict";
  var form = document.getElementById("key-form");
  if (!form) {
    return;
  }
  var input = document.getElementById("api-key");
  var row = input ? input.parentNode : null;
  if (input && row && row.dataset) {
    var toggle = document.createElement("button");
    toggle.type = "button";
    toggle.id = "toggle-key";
    toggle.className = "secondary";
    toggle.setAttribute("aria-controls", "api-key");
    toggle.setAttribute("aria-pressed", "false");
    toggle.textContent = row.dataset.show;
    toggle.addEventListener("click", function () {
      var hidden = input.type === "password";
      input.type = hidden ? "text" : "password";
      toggle.textContent = hidden ? row.dataset.hide : row.dataset.show;
      toggle.setAttribute("aria-pressed", hidden ? "true" : "false");
      input.focus();
    });
    row.appendChild(toggle);
  }
  form.addEventListener("submit", function () {
    var submit = document.getElementById("submit-key");
    var busy = document.getElementById("busy");
    if (input) {
      input.type = "password";
    }
    if (submit) {
      submit.setAttribute("aria-disabled", "true");
      submit.classList.add("is-busy");
    }
    form.setAttribute("aria-busy", "true");
    if (busy) {
      busy.textContent = form.dataset.busy || "";
    }
    // A second press while Pleo answers would only count as another attempt.
    form.addEventListener("submit", function (event) {
      event.preventDefault();
    });
  });
})();
