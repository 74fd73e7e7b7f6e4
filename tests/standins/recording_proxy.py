#!/usr/bin/env python3
"""A recording, fault-injecting HTTP proxy for the cloud tests.

Forwards every request to --upstream, appends one JSON line per request to --log (method, path, query, content
length, and the body when it is a form or JSON, so tests can assert what imgshift *sends*: moto ignores most
RegisterImage parameters), and answers a --fault-rate share of requests whose path matches --fault-path with
--fault-status (503 by default, or a JSON ThrottlingException with --fault-throttle). Prints the port it listens
on as its first line of output. Loopback only.
"""
import argparse
import http.client
import json
import random
import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--upstream", required=True)
ap.add_argument("--port", type=int, default=0)
ap.add_argument("--log", required=True)
ap.add_argument("--fault-rate", type=float, default=0.0)
ap.add_argument("--fault-path", default="^$")
ap.add_argument("--fault-status", type=int, default=503)
ap.add_argument("--fault-throttle", action="store_true")
ap.add_argument("--seed", type=int, default=7)
args = ap.parse_args()

up = urllib.parse.urlparse(args.upstream)
rnd = random.Random(args.seed)
lock = threading.Lock()
fault_re = re.compile(args.fault_path)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlparse(self.path)
        ctype = self.headers.get("Content-Type", "")
        rec = {"method": self.command, "path": parsed.path, "query": parsed.query, "length": length,
               "target": self.headers.get("X-Amz-Target", "")}
        if "x-www-form-urlencoded" in ctype or "json" in ctype:
            rec["body"] = body.decode("utf-8", "replace")
        with lock:
            inject = fault_re.search(parsed.path) is not None and rnd.random() < args.fault_rate
        rec["injected"] = inject
        if inject:
            if args.fault_throttle:
                payload = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded (injected)"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("x-amzn-ErrorType", "ThrottlingException")
            else:
                payload = b"injected fault"
                self.send_response(args.fault_status)
                self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            head = self.command == "HEAD"
            for k, v in resp.getheaders():
                # A HEAD reply's Content-Length is the resource's size (e.g. Get Blob Properties): keep it.
                if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                    self.send_header(k, v)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            conn.close()
            rec["status"] = resp.status
        with lock, open(args.log, "a") as f:
            f.write(json.dumps(rec) + "\n")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
