// Tandem console: small progressive enhancements shared by every page (no framework, no build).
"use strict";
document.documentElement.classList.add("js");

// The tenant switch submits as soon as another tenant is chosen (its button is for no-JS).
for (const form of document.querySelectorAll("form[data-autosubmit]")) {
  form.addEventListener("change", () => form.requestSubmit());
}

// Destructive forms ask first.
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}

// Copy buttons: data-copy names the id of the input to copy.
for (const button of document.querySelectorAll("button[data-copy]")) {
  button.addEventListener("click", async () => {
    const input = document.getElementById(button.dataset.copy);
    const status = button.parentElement.querySelector(".copy-status");
    try {
      await navigator.clipboard.writeText(input.value);
      if (status) status.textContent = "Copied.";
    } catch {
      // Clipboard API unavailable (plain http on a non-local host): select it for Ctrl+C instead.
      input.focus();
      input.select();
      if (status) status.textContent = "Press Ctrl+C to copy.";
    }
  });
}

for (const input of document.querySelectorAll("input[data-select-on-focus]")) {
  input.addEventListener("focus", () => input.select());
}
