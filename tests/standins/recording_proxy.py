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
ap.add_argument("--fault-action", default=None,
                help="also require the form body to name this EC2 action (Action=NAME) for a fault")
ap.add_argument("--fault-ec2-code", default=None,
                help="answer faults as EC2 does, an XML error with this code (e.g. Unavailable) and --fault-status")
ap.add_argument("--delay-ms", type=int, default=0,
                help="hold each forwarded request matching --fault-path this long (makes overlap observable)")
ap.add_argument("--seed", type=int, default=7)
args = ap.parse_args()

up = urllib.parse.urlparse(args.upstream)
rnd = random.Random(args.seed)
lock = threading.Lock()
fault_re = re.compile(args.fault_path)
# Requests being handled right now, and the most ever seen at once (each record carries "inflight": how many
# were in flight when it arrived, itself included), so tests can check a client's concurrency limit.
inflight = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlparse(self.path)
        global inflight
        with lock:
            inflight += 1
            now_inflight = inflight
        try:
            self.handle_counted(body, parsed, length, now_inflight)
        finally:
            with lock:
                inflight -= 1

    def handle_counted(self, body, parsed, length, now_inflight):
        ctype = self.headers.get("Content-Type", "")
        rec = {"method": self.command, "path": parsed.path, "query": parsed.query, "length": length,
               "target": self.headers.get("X-Amz-Target", ""), "inflight": now_inflight}
        if "x-www-form-urlencoded" in ctype or "json" in ctype:
            rec["body"] = body.decode("utf-8", "replace")
        matches = fault_re.search(parsed.path) is not None
        if args.fault_action is not None:
            matches = matches and ("Action=%s&" % args.fault_action) in (body.decode("utf-8", "replace") + "&")
        with lock:
            inject = matches and rnd.random() < args.fault_rate
        rec["injected"] = inject
        if inject:
            if args.fault_throttle:
                payload = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded (injected)"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("x-amzn-ErrorType", "ThrottlingException")
            elif args.fault_ec2_code:
                payload = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>%s</Code>"
                           "<Message>injected</Message></Error></Errors><RequestID>injected</RequestID></Response>"
                           % args.fault_ec2_code).encode()
                self.send_response(args.fault_status)
                self.send_header("Content-Type", "text/xml")
            else:
                payload = b"injected fault"
                self.send_response(args.fault_status)
                self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            if args.delay_ms and matches:
                threading.Event().wait(args.delay_ms / 1000.0)
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
