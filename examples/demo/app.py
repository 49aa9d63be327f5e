"""The demo's app tier: counts visits in redis and says who served whom.

Standard library only (it runs as a plain process in its pod's network
namespace). Talks RESP to redis directly.
"""
import http.server
import os
import socket

REDIS = (os.environ.get("REDIS_HOST", "redis"), int(os.environ.get("REDIS_PORT", "6379")))
POD_IP = os.environ.get("POD_IP", "unknown")


def incr(key):
    with socket.create_connection(REDIS, timeout=2) as s:
        s.sendall(b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key))
        reply = s.recv(64)
    if not reply.startswith(b":"):
        raise RuntimeError("redis answered %r" % reply)
    return int(reply[1:].split(b"\r\n")[0])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        client = self.headers.get("X-Real-IP") or self.client_address[0]
        try:
            body = "Hello World by %s from %s! This page has been visited %d times.\n" % (
                POD_IP, client, incr(b"hits"))
            code = 200
        except Exception as e:  # redis down: say so, do not hang
            body, code = "redis unavailable: %s\n" % e, 503
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, fmt, *args):
        print("%s %s" % (self.client_address[0], fmt % args), flush=True)


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "5000"))), Handler).serve_forever()
