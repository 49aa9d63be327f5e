"""A small HTTP server for watching readiness and rolling updates: every
answer names the pod that gave it, and a pod can be told to turn unready.

GET /         -> "<pod name> <pod IP> <VERSION>"
GET /healthz  -> 200, or 503 once /unready was requested (the readiness probe)
GET /unready  -> makes /healthz fail from now on
SIGTERM       -> dies at once, as many programs do: the preStop hook in
                 whoami.yaml is what keeps a rolling update from failing requests

Standard library only: it runs as a plain process in its pod's network namespace.
"""
import http.server
import os
import threading

POD = "%s %s %s" % (
    os.environ.get("POD_NAME", "unknown"),
    os.environ.get("POD_IP", "unknown"),
    os.environ.get("VERSION", "1"),
)
unready = threading.Event()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            code, body = (503, "unready\n") if unready.is_set() else (200, "ok\n")
        elif self.path == "/unready":
            unready.set()
            code, body = 200, "unready from now on\n"
        else:
            code, body = 200, POD + "\n"
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
