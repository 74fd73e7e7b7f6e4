#!/usr/bin/env python3
"""A fake Azure Resource Manager (Microsoft.Compute) + Entra token endpoint for the Azure tests, over HTTPS.

`serve`: answers the calls `imgshift upload azure` makes, with real long-running-operation semantics
(201/202 + Azure-AsyncOperation / Location, InProgress polls, Retry-After), and hands out, from beginGetAccess,
a blob SAS for a page blob it creates in Azurite (SharedKey with the Azurite dev key) of exactly uploadSizeBytes.
It checks the bearer token and records every request (one JSON line each) so tests assert what was sent. Faults:
--fail-lro OP (disk|grant|image|gallery: the operation ends Failed), --throttle-once REGEX (first matching request
gets 429 + Retry-After: 1), --sas-ttl SECONDS[,SECONDS...]. beginGetAccess with access Read hands out a read-only SAS; DELETE removes disks
(and their blobs), images and gallery versions. For `imgshift images`: lists (images, galleries, their image
definitions and versions; a gallery or definition exists when --gallery-sharing names it or a version implies it),
Gallery Sharing Profile - Update, Role Assignments - Create/Delete, Gallery Image Versions - Update (PATCH). With
--state-file it rewrites that file (JSON: disk names and
resource paths held) after every change, so tests count what exists. Prints its port as its first line. Loopback
only.

Snapshots (issue 22): PUT snapshots/NAME (createOption Copy from one of its disks, `incremental` kept) copies the
disk's blob into `snap-NAME.vhd` (metadata `lineage` = the disk's name, which tests/standins/fake_blob_diff.py
reads), GET, DELETE, and beginGetAccess (Read) / endGetAccess. The state file also lists the open grants
(`grants`: disks/NAME, snapshots/NAME with an active SAS), so tests count grants left open.

`get BLOB OUT` / `ranges BLOB` / `create-blob BLOB SIZE [--lineage L]` / `list CONTAINER` / `put-page BLOB OFFSET BYTE`
/ `sas BLOB --base URL`: Azurite helpers for the tests (SharedKey; `sas` prints a read SAS URL on --base).
"""
import argparse
import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import re
import ssl
import sys
import threading
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "2025-01-05"


# ---------------------------------------------------------------- Azurite (SharedKey, service SAS)
# Azurite's blob endpoint: --azurite, else IMGSHIFT_AZURITE_URL, else the port stand-ins used to have.
AZURITE = os.environ.get("IMGSHIFT_AZURITE_URL") or "http://127.0.0.1:10000"

def shared_key_request(azurite, method, path, query=None, headers=None, body=b""):
    """Signs and sends a request to Azurite with the dev account key. `path` starts with /container/..."""
    up = urllib.parse.urlparse(azurite)
    query = query or {}
    headers = dict(headers or {})
    headers["x-ms-date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
    headers["x-ms-version"] = VERSION
    full_path = f"/{ACCOUNT}{path}"
    length = str(len(body)) if body else ""
    std = ["Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
           "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range"]
    lower = {k.lower(): v for k, v in headers.items()}
    parts = [method]
    for h in std:
        parts.append(length if h == "Content-Length" else lower.get(h.lower(), ""))
    canon_headers = "".join(f"{k}:{lower[k]}\n" for k in sorted(k for k in lower if k.startswith("x-ms-")))
    canon_res = f"/{ACCOUNT}{full_path}" + "".join(f"\n{k}:{query[k]}" for k in sorted(query))
    sts = "\n".join(parts) + "\n" + canon_headers + canon_res
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), sts.encode(), hashlib.sha256).digest()).decode()
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{sig}"
    if body:
        headers["Content-Length"] = length
    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
    qs = urllib.parse.urlencode(query)
    conn.request(method, full_path + ("?" + qs if qs else ""), body=body or None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def create_page_blob(azurite, container, blob, size, lineage=None):
    st, _ = shared_key_request(azurite, "PUT", f"/{container}", {"restype": "container"})
    if st not in (201, 409):
        raise RuntimeError(f"create container: {st}")
    headers = {"x-ms-blob-type": "PageBlob", "x-ms-blob-content-length": str(size)}
    if lineage:
        headers["x-ms-meta-lineage"] = lineage
    st, data = shared_key_request(azurite, "PUT", f"/{container}/{blob}", {}, headers)
    if st != 201:
        raise RuntimeError(f"create page blob: {st} {data[:200]}")


def blob_sas(container, blob, ttl, perms="rw"):
    """A service SAS (sr=b, `perms`) for one blob, signed with the dev key (string-to-sign of 2020-12-06+)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    st = (now - datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    se = (now + datetime.timedelta(seconds=ttl)).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [perms, st, se, f"/blob/{ACCOUNT}/{container}/{blob}", "", "", "", VERSION, "b", "", "", "", "", "", "",
              ""]
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), "\n".join(fields).encode(), hashlib.sha256).digest())
    return urllib.parse.urlencode({"sv": VERSION, "st": st, "se": se, "sr": "b", "sp": perms, "sig": sig.decode()})


def split_blob(name):
    container, blob = name.split("/", 1)
    return container, blob


# ---------------------------------------------------------------- the fake ARM
class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.disks = {}      # name -> dict
        self.snapshots = {}  # name -> dict (see the snapshot section of make_handler)
        self.resources = {}  # path -> json
        self.ops = {}        # op id -> {"polls": n, "fail": bool, "result": json or None}
        self.throttled = set()
        self.seq = 0
        self.grants = 0
        self.shared = {}     # gallery -> [{"type", "id"}] (its sharing profile's groups)

    def save(self):
        """Writes what exists to --state-file (atomically); call with the lock held."""
        if not self.args.state_file:
            return
        tmp = self.args.state_file + ".tmp"
        with open(tmp, "w") as f:
            grants = [f"disks/{n}" for n, d in self.disks.items()
                      if d["properties"].get("diskState", "").startswith("Active")]
            grants += [f"snapshots/{n}" for n, d in self.snapshots.items()
                       if d["properties"].get("diskState", "").startswith("Active")]
            json.dump({"disks": sorted(self.disks), "resources": sorted(self.resources),
                       "snapshots": sorted(self.snapshots), "grants": sorted(grants)}, f)
        os.replace(tmp, self.args.state_file)


def make_handler(state):
    a = state.args
    base_re = re.compile(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/(.*)$")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *x):
            pass

        def reply(self, status, body=None, headers=None):
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def err(self, status, code, msg):
            self.reply(status, {"error": {"code": code, "message": msg}})

        def new_op(self, fail=False, result=None):
            with state.lock:
                state.seq += 1
                op = f"op{state.seq}"
                state.ops[op] = {"polls": a.lro_polls, "fail": fail, "result": result}
            host = f"https://127.0.0.1:{self.server.server_address[1]}"
            return op, host

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            u = urllib.parse.urlparse(self.path)
            q = urllib.parse.parse_qs(u.query)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            auth = self.headers.get("Authorization", "")
            rec = {"method": self.command, "path": u.path, "api": q.get("api-version", [""])[0],
                   "auth": auth == f"Bearer {a.token}", "body": body}
            if u.path.endswith("/oauth2/v2.0/token"):
                form = urllib.parse.parse_qs(raw.decode())
                rec["body"] = {"client_id": form.get("client_id", [""])[0],
                               "scope": form.get("scope", [""])[0]}
                self.log(rec)
                if form.get("client_secret", [""])[0] != a.client_secret:
                    return self.reply(401, {"error": "invalid_client", "error_description": "AADSTS7000215: bad secret",
                                            "error_codes": [7000215]})
                return self.reply(200, {"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600,
                                        "access_token": a.token})
            with state.lock:
                throttle = a.throttle_once and re.search(a.throttle_once, u.path) and u.path not in state.throttled
                if throttle:
                    state.throttled.add(u.path)
            rec["throttled"] = bool(throttle)
            self.log(rec)
            if not rec["auth"]:
                return self.err(401, "AuthenticationFailed", "missing or wrong bearer token")
            if throttle:
                return self.reply(429, {"error": {"code": "TooManyRequests", "message": "slow down"}},
                                  {"Retry-After": "1"})
            if u.path.startswith("/operations/"):
                return self.poll_op(u.path.split("/")[2], u.path.endswith("/result"))
            m = base_re.match(u.path)
            if not m:
                return self.err(404, "NotFound", f"no route {u.path}")
            sub, rg, rest = m.groups()
            if sub != a.subscription:
                return self.err(404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found.")
            if rg != a.resource_group:
                return self.err(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            parts = rest.split("/")
            if "/providers/Microsoft.Authorization/roleAssignments/" in rest:
                return self.role_assignment(sub, rg, rest, body)
            if len(parts) == 3 and parts[0] == "galleries" and parts[2] == "share" and self.command == "POST":
                return self.gallery_share(parts[1], body)
            if self.command == "GET" and (rest in ("images", "galleries") or (
                    parts[0] == "galleries" and len(parts) in (3, 5) and parts[-1] in ("images", "versions"))):
                return self.list_children(sub, rg, rest)
            if self.command == "PATCH" and parts[0] == "galleries" and len(parts) == 6 and parts[4] == "versions":
                return self.patch_version(rest, body)
            if parts[0] == "disks" and len(parts) == 2:
                return self.disk(parts[1], body)
            if parts[0] == "disks" and len(parts) == 3 and self.command == "POST":
                return self.disk_action(parts[1], parts[2], body)
            if parts[0] == "snapshots" and len(parts) == 2:
                return self.snapshot(sub, rg, parts[1], body)
            if parts[0] == "snapshots" and len(parts) == 3 and self.command == "POST":
                return self.snapshot_action(parts[1], parts[2], body)
            if parts[0] in ("images", "galleries") and self.command in ("PUT", "GET", "DELETE"):
                return self.resource(rest, body, "image" if parts[0] == "images" else "gallery")
            return self.err(404, "NotFound", f"no route {u.path}")

        def log(self, rec):
            with state.lock, open(a.log, "a") as f:
                f.write(json.dumps(rec) + "\n")

        def poll_op(self, op, result):
            with state.lock:
                o = state.ops.get(op)
                if o is None:
                    return self.err(404, "NotFound", "no such operation")
                if o["polls"] > 0:
                    o["polls"] -= 1
                    running = True
                else:
                    running = False
            if result:
                if running:
                    return self.reply(202, None, {"Location": self.path, "Retry-After": "0"})
                return self.reply(200, o["result"])
            if running:
                return self.reply(200, {"status": "InProgress"}, {"Retry-After": "0"})
            if o["fail"]:
                return self.reply(200, {"status": "Failed",
                                        "error": {"code": "InternalOperationError", "message": "injected failure"}})
            return self.reply(200, {"status": "Succeeded"})

        def disk(self, name, body):
            if self.command == "GET":
                d = state.disks.get(name)
                if d is None:
                    return self.err(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/disks/{name}' was not found.")
                return self.reply(200, d)
            if self.command == "DELETE":
                with state.lock:
                    d = state.disks.get(name)
                    if d is None:
                        return self.reply(204)
                    if d["properties"].get("diskState", "").startswith("Active"):
                        return self.err(409, "OperationNotAllowed",
                                        f"Disk {name} has an active SAS: revoke it before deleting the disk.")
                    del state.disks[name]
                    state.save()
                st, data = shared_key_request(a.azurite, "DELETE", f"/{a.container}/{name}.vhd")
                if st not in (202, 404):
                    return self.err(500, "InternalError", f"Azurite delete blob: {st}")
                op, host = self.new_op()
                return self.reply(202, None, {"Location": f"{host}/operations/{op}/result", "Retry-After": "0"})
            if self.command != "PUT":
                return self.err(405, "MethodNotAllowed", "")
            props = (body or {}).get("properties", {})
            cd = props.get("creationData", {})
            size = cd.get("uploadSizeBytes")
            if cd.get("createOption") != "Upload" or not isinstance(size, int):
                return self.err(400, "InvalidParameter", "createOption Upload and uploadSizeBytes required")
            if size % (1 << 20) != 512 or size < (20 << 20) + 512:
                return self.err(400, "InvalidParameter", f"uploadSizeBytes {size} is not N MiB + 512 with N >= 20")
            blob = f"{a.container}/{name}.vhd"
            container, b = split_blob(blob)
            if name not in state.disks:
                create_page_blob(a.azurite, container, b, size)
            d = {"name": name, "location": body.get("location"), "properties": dict(props)}
            d["properties"]["provisioningState"] = "Succeeded"
            d["properties"]["diskState"] = "ReadyToUpload"
            with state.lock:
                state.disks[name] = d
                state.save()
            op, host = self.new_op(fail="disk" in a.fail_lro)
            self.reply(201, {**d, "properties": {**d["properties"], "provisioningState": "Updating"}},
                       {"Azure-AsyncOperation": f"{host}/operations/{op}", "Retry-After": "0"})

        def disk_action(self, name, action, body):
            d = state.disks.get(name)
            if d is None:
                return self.err(404, "ResourceNotFound", f"disk {name} not found")
            if action == "beginGetAccess":
                access = (body or {}).get("access")
                if access not in ("Write", "Read"):
                    return self.err(400, "InvalidParameter", "access must be Write or Read")
                if access == "Read" and d["properties"].get("diskState") in ("ReadyToUpload", "ActiveUpload"):
                    return self.err(409, "OperationNotAllowed", f"disk {name} is not uploaded yet")
                d["properties"]["diskState"] = "ActiveUpload" if access == "Write" else "ActiveSAS"
                with state.lock:
                    ttls = [int(x) for x in a.sas_ttl.split(",")]
                    ttl = ttls[min(state.grants, len(ttls) - 1)]
                    state.grants += 1
                    state.save()
                perms = "rw" if access == "Write" else "r"
                sas = f"{a.blob_base}/{ACCOUNT}/{a.container}/{name}.vhd?" + blob_sas(a.container, f"{name}.vhd", ttl,
                                                                                    perms)
                op, host = self.new_op(fail="grant" in a.fail_lro, result={"accessSAS": sas})
                return self.reply(202, None, {"Azure-AsyncOperation": f"{host}/operations/{op}",
                                              "Location": f"{host}/operations/{op}/result", "Retry-After": "0"})
            if action == "endGetAccess":
                d["properties"]["diskState"] = "Unattached"
                with state.lock:
                    state.save()
                op, host = self.new_op()
                return self.reply(202, None, {"Location": f"{host}/operations/{op}/result", "Retry-After": "0"})
            return self.err(404, "NotFound", action)

        # ---------------------------------------------------------------- snapshots (issue 22: azure:snapshot/...)
        def snapshot(self, sub, rg, name, body):
            if self.command == "GET":
                d = state.snapshots.get(name)
                if d is None:
                    return self.err(404, "ResourceNotFound",
                                    f"The Resource 'Microsoft.Compute/snapshots/{name}' was not found.")
                return self.reply(200, d)
            if self.command == "DELETE":
                with state.lock:
                    d = state.snapshots.get(name)
                    if d is None:
                        return self.reply(204)
                    if d["properties"].get("diskState", "").startswith("Active"):
                        return self.err(409, "OperationNotAllowed",
                                        f"Snapshot {name} has an active SAS: revoke it before deleting it.")
                    del state.snapshots[name]
                    state.save()
                shared_key_request(a.azurite, "DELETE", f"/{a.container}/snap-{name}.vhd")
                op, host = self.new_op()
                return self.reply(202, None, {"Location": f"{host}/operations/{op}/result", "Retry-After": "0"})
            if self.command != "PUT":
                return self.err(405, "MethodNotAllowed", "")
            props = (body or {}).get("properties", {})
            cd = props.get("creationData", {})
            src = cd.get("sourceResourceId", "")
            prefix = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/disks/"
            if cd.get("createOption") != "Copy" or not src.startswith(prefix):
                return self.err(400, "InvalidParameter",
                                "createOption Copy with sourceResourceId of a disk of this resource group required")
            disk_name = src[len(prefix):]
            d = state.disks.get(disk_name)
            if d is None:
                return self.err(404, "ResourceNotFound", f"disk {disk_name} not found")
            if d["properties"].get("diskState") in ("ReadyToUpload", "ActiveUpload"):
                return self.err(409, "OperationNotAllowed", f"disk {disk_name} is not uploaded yet")
            # The snapshot's blob: a copy of the disk's page blob (allocated pages only), marked with its lineage.
            src_blob = f"/{a.container}/{disk_name}.vhd"
            st, data = shared_key_request(a.azurite, "GET", src_blob, {"comp": "pagelist"})
            if st != 200:
                return self.err(500, "InternalError", f"Azurite page ranges: {st}")
            size = d["properties"]["creationData"]["uploadSizeBytes"]
            create_page_blob(a.azurite, a.container, f"snap-{name}.vhd", size, lineage=disk_name)
            for p in ET.fromstring(data).iter("PageRange"):
                at, end = int(p.find("Start").text), int(p.find("End").text) + 1
                while at < end:
                    n = min(4 << 20, end - at)
                    st, chunk = shared_key_request(a.azurite, "GET", src_blob, {}, {"x-ms-range": f"bytes={at}-{at + n - 1}"})
                    if st not in (200, 206):
                        return self.err(500, "InternalError", f"Azurite read: {st}")
                    st, _ = shared_key_request(a.azurite, "PUT", f"/{a.container}/snap-{name}.vhd", {"comp": "page"},
                                               {"x-ms-page-write": "update",
                                                "x-ms-range": f"bytes={at}-{at + n - 1}"}, chunk)
                    if st != 201:
                        return self.err(500, "InternalError", f"Azurite put page: {st}")
                    at += n
            snap = {"name": name, "location": (body or {}).get("location"), "properties": {
                "creationData": cd, "incremental": bool(props.get("incremental")),
                "diskSizeBytes": size - 512, "hyperVGeneration": d["properties"].get("hyperVGeneration"),
                "osType": d["properties"].get("osType"), "diskState": "Unattached",
                "provisioningState": "Succeeded"}}
            with state.lock:
                state.snapshots[name] = snap
                state.save()
            op, host = self.new_op()
            self.reply(201, {**snap, "properties": {**snap["properties"], "provisioningState": "Updating"}},
                       {"Azure-AsyncOperation": f"{host}/operations/{op}", "Retry-After": "0"})

        def snapshot_action(self, name, action, body):
            d = state.snapshots.get(name)
            if d is None:
                return self.err(404, "ResourceNotFound", f"snapshot {name} not found")
            if action == "beginGetAccess":
                if (body or {}).get("access") != "Read":
                    return self.err(400, "InvalidParameter", "a snapshot grants Read access only")
                with state.lock:
                    d["properties"]["diskState"] = "ActiveSAS"
                    ttls = [int(x) for x in a.sas_ttl.split(",")]
                    ttl = ttls[min(state.grants, len(ttls) - 1)]
                    state.grants += 1
                    state.save()
                blob = f"snap-{name}.vhd"
                sas = f"{a.blob_base}/{ACCOUNT}/{a.container}/{blob}?" + blob_sas(a.container, blob, ttl, "r")
                op, host = self.new_op(fail="grant" in a.fail_lro, result={"accessSAS": sas})
                return self.reply(202, None, {"Azure-AsyncOperation": f"{host}/operations/{op}",
                                              "Location": f"{host}/operations/{op}/result", "Retry-After": "0"})
            if action == "endGetAccess":
                with state.lock:
                    d["properties"]["diskState"] = "Unattached"
                    state.save()
                op, host = self.new_op()
                return self.reply(202, None, {"Location": f"{host}/operations/{op}/result", "Retry-After": "0"})
            return self.err(404, "NotFound", action)
        # ---------------------------------------------------------------- end of snapshots

        # ---- images after migration: lists, gallery sharing, role assignments, replication (issue 25)
        def implied(self, rest):
            """A gallery or image definition exists when named by --gallery-sharing or implied by a version."""
            r = state.resources.get(rest)
            if r is not None:
                return r
            parts = rest.split("/")
            if parts[0] != "galleries" or len(parts) not in (2, 4):
                return None
            if len(parts) == 2 and parts[1] in a.gallery_sharing:
                pass
            elif not any(k.startswith(rest + "/") for k in state.resources):
                return None
            r = {"name": parts[-1], "location": "westeurope", "properties": {"provisioningState": "Succeeded"}}
            if len(parts) == 2:
                r["properties"]["sharingProfile"] = {"permissions": a.gallery_sharing.get(parts[1], "Private"),
                                                     "groups": state.shared.get(parts[1], [])}
            return r

        def list_children(self, sub, rg, rest):
            """Images - List By Resource Group, Galleries - List By Resource Group, Gallery Images - List By
            Gallery, Gallery Image Versions - List By Gallery Image: {"value": [...]} (one page)."""
            depth = len(rest.split("/")) + 1
            names = set()
            with state.lock:
                keys = list(state.resources)
            for k in keys + [f"galleries/{g}" for g in a.gallery_sharing]:
                if k.startswith(rest + "/") and "/providers/" not in k:
                    names.add("/".join(k.split("/")[:depth]))
            base = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/"
            out = []
            for k in sorted(names):
                r = self.implied(k)
                if r is not None:
                    out.append({**r, "name": k.split("/")[-1], "id": base + k})
            return self.reply(200, {"value": out})

        def gallery_share(self, gallery, body):
            """Gallery Sharing Profile - Update: Add/Remove groups on a direct-shared (Groups) gallery,
            EnableCommunity on a community gallery, Reset on either."""
            g = self.implied(f"galleries/{gallery}")
            if g is None:
                return self.err(404, "ResourceNotFound", f"gallery {gallery}")
            kind = g["properties"]["sharingProfile"]["permissions"]
            op = (body or {}).get("operationType")
            groups = (body or {}).get("groups") or []
            if op in ("Add", "Remove"):
                if kind != "Groups":
                    return self.err(409, "OperationNotAllowed", f"gallery {gallery} is not direct-shared")
                if not groups or any(x.get("type") not in ("Subscriptions", "AADTenants") or not x.get("ids")
                                     for x in groups):
                    return self.err(400, "InvalidParameter", "groups need a type and ids")
                with state.lock:
                    cur = state.shared.setdefault(gallery, [])
                    for grp in groups:
                        for i in grp["ids"]:
                            item = {"type": grp["type"], "id": i}
                            if op == "Add" and item not in cur:
                                cur.append(item)
                            if op == "Remove" and item in cur:
                                cur.remove(item)
            elif op == "EnableCommunity":
                if kind != "Community":
                    return self.err(409, "OperationNotAllowed", f"gallery {gallery} is not a community gallery")
                with state.lock:
                    state.shared[gallery] = [{"type": "Community", "id": "public"}]
            elif op == "Reset":
                with state.lock:
                    state.shared[gallery] = []
            else:
                return self.err(400, "InvalidParameter", f"operationType {op}")
            with state.lock:
                state.save()
            op_id, host = self.new_op(result=body)
            return self.reply(202, None, {"Location": f"{host}/operations/{op_id}/result", "Retry-After": "0"})

        def role_assignment(self, sub, rg, rest, body):
            """Role Assignments - Create (PUT, 201) / Delete (200 with the assignment, 204 when absent) / Get."""
            scope_rest, name = rest.split("/providers/Microsoft.Authorization/roleAssignments/", 1)
            if not re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", name):
                return self.err(400, "InvalidRoleAssignmentId", f"{name} is not a GUID")
            base = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/"
            if self.command == "GET":
                r = state.resources.get(rest)
                return self.reply(200, r) if r else self.err(404, "RoleAssignmentNotFound", name)
            if self.command == "DELETE":
                with state.lock:
                    r = state.resources.pop(rest, None)
                    state.save()
                return self.reply(200, r) if r else self.reply(204)
            if self.command != "PUT":
                return self.err(405, "MethodNotAllowed", "")
            if self.implied(scope_rest) is None:
                return self.err(404, "ResourceNotFound", f"scope {scope_rest}")
            p = (body or {}).get("properties") or {}
            role, principal = p.get("roleDefinitionId"), p.get("principalId")
            if not role or not principal:
                return self.err(400, "InvalidRequestContent", "roleDefinitionId and principalId are required")
            if not re.fullmatch(rf"/subscriptions/{re.escape(sub)}/providers/Microsoft\.Authorization/"
                                r"roleDefinitions/[0-9a-fA-F-]{36}", role):
                return self.err(400, "InvalidRoleDefinitionId", role)
            with state.lock:
                for k, r in state.resources.items():
                    if (k != rest and k.startswith(scope_rest + "/providers/Microsoft.Authorization/")
                            and r["properties"]["principalId"] == principal
                            and r["properties"]["roleDefinitionId"] == role):
                        return self.err(409, "RoleAssignmentExists", "The role assignment already exists.")
                r = {"id": base + rest, "name": name, "type": "Microsoft.Authorization/roleAssignments",
                     "properties": {"roleDefinitionId": role, "principalId": principal, "scope": base + scope_rest}}
                state.resources[rest] = r
                state.save()
            return self.reply(201, r)

        def patch_version(self, rest, body):
            """Gallery Image Versions - Update: merges publishingProfile (targetRegions), long-running."""
            with state.lock:
                r = state.resources.get(rest)
            if r is None:
                return self.err(404, "ResourceNotFound", rest)
            pp = ((body or {}).get("properties") or {}).get("publishingProfile") or {}
            regions = pp.get("targetRegions")
            if regions is not None:
                names = [t.get("name") for t in regions]
                if not all(isinstance(n, str) and n for n in names):
                    return self.err(400, "InvalidParameter", "every target region needs a name")
                home = (r.get("location") or "").replace(" ", "").lower()
                if home and home not in [n.replace(" ", "").lower() for n in names]:
                    return self.err(400, "InvalidParameter",
                                    "the gallery image version's own region must be one of its target regions")
            with state.lock:
                props = r.setdefault("properties", {})
                props.setdefault("publishingProfile", {}).update(pp)
                state.save()
            op, host = self.new_op()
            return self.reply(200, r, {"Azure-AsyncOperation": f"{host}/operations/{op}", "Retry-After": "0"})

        def resource(self, rest, body, kind):
            if self.command == "GET":
                r = self.implied(rest)
                if r is None:
                    return self.err(404, "ResourceNotFound", rest)
                return self.reply(200, r)
            if self.command == "DELETE":
                with state.lock:
                    if state.resources.pop(rest, None) is None:
                        return self.reply(204)
                    state.save()
                op, host = self.new_op()
                return self.reply(202, None, {"Azure-AsyncOperation": f"{host}/operations/{op}", "Retry-After": "0"})
            r = dict(body or {})
            r.setdefault("properties", {})["provisioningState"] = "Succeeded"
            with state.lock:
                state.resources[rest] = r
                state.save()
            op, host = self.new_op(fail=kind in a.fail_lro)
            self.reply(201, {**r, "properties": {**r["properties"], "provisioningState": "Creating"}},
                       {"Azure-AsyncOperation": f"{host}/operations/{op}", "Retry-After": "0"})

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = handle_any

    return H


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--azurite", default=AZURITE)
    s.add_argument("--blob-base", help="base URL put in SAS URLs (default: --azurite)")
    s.add_argument("--container", required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--client-secret", required=True)
    s.add_argument("--subscription", required=True)
    s.add_argument("--resource-group", required=True)
    s.add_argument("--sas-ttl", default="3600", help="seconds; a comma list gives the n-th grant its own (last repeats)")
    s.add_argument("--lro-polls", type=int, default=1)
    s.add_argument("--fail-lro", default="")
    s.add_argument("--throttle-once", default="")
    s.add_argument("--state-file", default="")
    s.add_argument("--gallery-sharing", action="append", default=[],
                   help="NAME=Private|Groups|Community: a gallery that exists with that sharing profile")
    g = sub.add_parser("get")
    g.add_argument("blob")
    g.add_argument("out")
    g.add_argument("--azurite", default=AZURITE)
    r = sub.add_parser("ranges")
    r.add_argument("blob")
    r.add_argument("--azurite", default=AZURITE)
    c = sub.add_parser("create-blob")
    c.add_argument("blob")
    c.add_argument("size", type=int)
    c.add_argument("--lineage", default=None, help="metadata x-ms-meta-lineage (the disk a snapshot is of)")
    c.add_argument("--azurite", default=AZURITE)
    sa = sub.add_parser("sas", help="prints a read SAS URL of BLOB on --base")
    sa.add_argument("blob")
    sa.add_argument("--base", required=True)
    sa.add_argument("--ttl", type=int, default=3600)
    ls = sub.add_parser("list")
    ls.add_argument("container")
    ls.add_argument("--azurite", default=AZURITE)
    pp = sub.add_parser("put-page", help="writes one 512-byte page of BYTE at OFFSET (to damage a blob)")
    pp.add_argument("blob")
    pp.add_argument("offset", type=int)
    pp.add_argument("byte", type=int)
    pp.add_argument("--azurite", default=AZURITE)
    a = ap.parse_args()
    if a.cmd == "put-page":
        st, data = shared_key_request(a.azurite, "PUT", "/" + a.blob, {"comp": "page"}, {
            "x-ms-page-write": "update", "x-ms-range": f"bytes={a.offset}-{a.offset + 511}"}, bytes([a.byte]) * 512)
        if st != 201:
            sys.exit(f"put page: {st} {data[:200]}")
        return
    if a.cmd == "list":
        st, data = shared_key_request(a.azurite, "GET", f"/{a.container}", {"restype": "container", "comp": "list"})
        if st == 404:
            print("[]")
            return
        if st != 200:
            sys.exit(f"list blobs: {st}")
        print(json.dumps(sorted(n.text for n in ET.fromstring(data).iter("Name"))))
        return
    if a.cmd == "get":
        st, data = shared_key_request(a.azurite, "GET", "/" + a.blob)
        if st != 200:
            sys.exit(f"get blob: {st}")
        open(a.out, "wb").write(data)
        return
    if a.cmd == "ranges":
        st, data = shared_key_request(a.azurite, "GET", "/" + a.blob, {"comp": "pagelist"})
        if st != 200:
            sys.exit(f"get page ranges: {st}")
        root = ET.fromstring(data)
        print(json.dumps([[int(p.find("Start").text), int(p.find("End").text)] for p in root.iter("PageRange")]))
        return
    if a.cmd == "create-blob":
        container, b = split_blob(a.blob)
        create_page_blob(a.azurite, container, b, a.size, lineage=a.lineage)
        return
    if a.cmd == "sas":
        container, b = split_blob(a.blob)
        print(f"{a.base.rstrip('/')}/{ACCOUNT}/{a.blob}?" + blob_sas(container, b, a.ttl, "r"))
        return
    a.blob_base = (a.blob_base or a.azurite).rstrip("/")
    a.fail_lro = [x for x in a.fail_lro.split(",") if x]
    a.gallery_sharing = dict(x.split("=", 1) for x in a.gallery_sharing)
    state = State(a)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
