"use strict";
// The dashboard's one event stream for every tab of a browser (a SharedWorker: app.js
// connect). Chromium opens at most 6 HTTP/1.1 connections to one server, and a stream per tab
// held one each for good: from the sixth tab on nothing loaded. Web Locks, which elected one
// tab to hold the stream, exist in secure contexts only (HTTPS, localhost); a SharedWorker and
// an EventSource inside it do not ask for one (HTML: SharedWorker and EventSource are exposed
// to windows and workers without [SecureContext]), so the dashboard opened over plain HTTP
// from another host (http.plain_api: allow) shares one stream too.
//
// The worker lives while a tab of this origin is connected. Its EventSource reconnects by
// itself after a drop, sending the last event's id (Last-Event-ID): the server gives what was
// published meanwhile, or "missed" when it no longer holds it (the tabs reload what they show).

const KINDS = ["machine", "inventory", "warnings", "missed"];
const ports = new Set();
const kept = {}; // the last "live", "inventory" and "warnings", for a tab that connects
let source = null;

function tell(kind, data) {
  if (kind !== "machine" && kind !== "missed") kept[kind] = data;
  for (const port of ports) port.postMessage({kind, data});
}

function open() {
  source = new EventSource("/api/v1/events/stream");
  source.addEventListener("open", () => tell("live", true));
  source.addEventListener("error", () => tell("live", false));
  for (const kind of KINDS) source.addEventListener(kind, (msg) => tell(kind, msg.data));
}

function join(port) {
  ports.add(port);
  for (const [kind, data] of Object.entries(kept)) port.postMessage({kind, data});
  // Refused (a session that ended: 401) an EventSource stays closed; a tab logged in again
  // connects, and the stream opens again.
  if (!source || source.readyState === EventSource.CLOSED) open();
}

self.addEventListener("connect", (e) => {
  const port = e.ports[0];
  // A tab says "bye" as it goes (pagehide) and "hello" if it comes back (the back/forward
  // cache): no message is posted to a page that is gone, nor missed by one that returned.
  port.onmessage = ({data}) => {
    if (data === "bye") ports.delete(port);
    else if (data === "hello") join(port);
  };
  join(port);
});
