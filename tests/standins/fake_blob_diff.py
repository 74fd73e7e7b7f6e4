#!/usr/bin/env python3
"""A page-blob front for Azurite that answers the managed-disk page-range diff, which Azurite does not implement
(Azure/Azurite#812): Get Page Ranges (`GET ?comp=pagelist`) with the header `x-ms-previous-snapshot-url`.

Every other request is forwarded to --upstream (Azurite) unchanged, SAS and all. A diff request is answered here,
following the Get Page Ranges REST reference (https://learn.microsoft.com/rest/api/storageservices/get-page-ranges,
"GetManagedDiskPageRangesDiff"): a `PageList` whose `PageRange` elements are the pages written since the previous
snapshot and whose `ClearRange` elements are the pages cleared since then (`Start`/`End` inclusive byte offsets,
512-byte pages), in offset order, with `NextMarker` paging when `maxresults` (or --page-items) is given. The fake computes it from the
two blobs' contents, read from Azurite with the two SAS URLs: a page is changed when it is allocated in the
target and differs from (or is absent in) the previous one; cleared when it is allocated only in the previous
one. The previous snapshot must be of the same disk: both blobs carry the metadata `x-ms-meta-lineage` (the fake
ARM sets it to the disk's name); a different or missing lineage answers 409 PreviousSnapshotNotFound, an
unreadable previous snapshot 404 PreviousSnapshotNotFound (Blob service error codes). Prints its port first.
Counts the diff requests it answered in --log (one JSON line each). Loopback only.
"""
import argparse
import http.client
import json
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = 512
READ = 4 << 20

ap = argparse.ArgumentParser()
ap.add_argument("--upstream", required=True)
ap.add_argument("--log", required=True)
ap.add_argument("--page-items", type=int, default=0,
                help="answer at most this many ranges per response, with a NextMarker (the service may page)")
args = ap.parse_args()
up = urllib.parse.urlparse(args.upstream)
lock = threading.Lock()


def upstream(method, path_qs, headers=None, body=None):
    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
    conn.request(method, path_qs, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    hdrs = r.getheaders()
    conn.close()
    return r.status, hdrs, data


def local(url):
    """The path and query of a SAS URL (its host is this front or Azurite: both serve the same blobs)."""
    u = urllib.parse.urlparse(url)
    return u.path, u.query


def ranges(path, query):
    """Allocated page ranges of the blob, as [start, end) lists, or (status, None)."""
    q = query + ("&" if query else "") + "comp=pagelist"
    st, _, data = upstream("GET", f"{path}?{q}", {"x-ms-version": "2025-01-05"})
    if st != 200:
        return st, None
    out = [[int(p.find("Start").text), int(p.find("End").text) + 1] for p in ET.fromstring(data).iter("PageRange")]
    return 200, out


def props(path, query):
    st, hdrs, _ = upstream("HEAD", f"{path}?{query}", {"x-ms-version": "2025-01-05"})
    return st, {k.lower(): v for k, v in hdrs}


def read(path, query, start, end):
    st, _, data = upstream("GET", f"{path}?{query}", {"x-ms-version": "2025-01-05",
                                                        "x-ms-range": f"bytes={start}-{end - 1}"})
    if st not in (200, 206) or len(data) != end - start:
        raise RuntimeError(f"read {start}-{end}: {st}")
    return data


def pages_of(rs):
    for s, e in rs:
        yield from range(s // PAGE, e // PAGE)


def contents(path, query, rs):
    """{page index: bytes} of the allocated pages (test blobs are small)."""
    out = {}
    for s, e in rs:
        at = s
        while at < e:
            n = min(READ, e - at)
            data = read(path, query, at, at + n)
            for i in range(n // PAGE):
                out[(at // PAGE) + i] = data[i * PAGE:(i + 1) * PAGE]
            at += n
    return out


def merge(pages):
    out = []
    for p in sorted(pages):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [(s * PAGE, e * PAGE) for s, e in out]


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, status, headers, body):
        self.send_response(status)
        # A HEAD answer keeps the upstream's Content-Length (the blob's size); others get their body's.
        skip = {"transfer-encoding", "connection"} | ({"content-length"} if self.command != "HEAD" else set())
        for k, v in headers:
            if k.lower() not in skip:
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code, msg):
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'
                ).encode()
        self.send(status, [("Content-Type", "application/xml"), ("x-ms-error-code", code)], body)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        u = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(u.query)
        prev = self.headers.get("x-ms-previous-snapshot-url")
        if self.command == "GET" and q.get("comp") == ["pagelist"] and prev:
            return self.diff(u, q, prev)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        st, hdrs, data = upstream(self.command, self.path, headers, body)
        self.send(st, hdrs, data)

    def diff(self, u, q, prev):
        sas_q = urllib.parse.urlencode([(k, v) for k, vs in q.items() for v in vs
                                        if k not in ("comp", "marker", "maxresults", "prevsnapshot")])
        ppath, pquery = local(prev)
        st, cur_props = props(u.path, sas_q)
        if st != 200:
            return self.error(st, "BlobNotFound", "The specified blob does not exist.")
        st, prev_props = props(ppath, pquery)
        if st != 200:
            return self.error(404, "PreviousSnapshotNotFound", "The previous snapshot is not found.")
        lineage = cur_props.get("x-ms-meta-lineage")
        if not lineage or lineage != prev_props.get("x-ms-meta-lineage"):
            return self.error(409, "PreviousSnapshotNotFound",
                              "The previous snapshot is not a snapshot of the same disk.")
        _, cur = ranges(u.path, sas_q)
        _, old = ranges(ppath, pquery)
        a = contents(ppath, pquery, old)
        b = contents(u.path, sas_q, cur)
        changed = [p for p in b if a.get(p) != b[p]]
        cleared = [p for p in a if p not in b]
        items = [(s, e, "PageRange") for s, e in merge(changed)] + [(s, e, "ClearRange") for s, e in merge(cleared)]
        items.sort()
        start = int(q.get("marker", ["0"])[0] or 0)
        items = [i for i in items if i[0] >= start]
        maxr = int(q.get("maxresults", ["0"])[0] or 0)
        if args.page_items:
            maxr = min(maxr, args.page_items) if maxr else args.page_items
        marker = None
        if maxr and len(items) > maxr:
            marker = str(items[maxr][0])
            items = items[:maxr]
        root = ET.Element("PageList")
        for s, e, kind in items:
            el = ET.SubElement(root, kind)
            ET.SubElement(el, "Start").text = str(s)
            ET.SubElement(el, "End").text = str(e - 1)
        ET.SubElement(root, "NextMarker").text = marker or ""
        body = b'<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root)
        with lock, open(args.log, "a") as f:
            f.write(json.dumps({"diff": u.path, "previous": ppath, "marker": start, "items": len(items)}) + "\n")
        size = cur_props.get("x-ms-blob-content-length") or cur_props.get("content-length", "0")
        self.send(200, [("Content-Type", "application/xml"), ("x-ms-blob-content-length", size),
                        ("x-ms-version", "2025-01-05")], body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
