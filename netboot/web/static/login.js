"use strict";
// Shown after a failed login (/login?error=1); the only script of the login page.
if (new URLSearchParams(location.search).has("error")) {
  document.getElementById("error").hidden = false;
}
