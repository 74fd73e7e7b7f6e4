#!/usr/bin/env python3
"""Side-by-side benchmark: imgshift convert vs qemu-img convert, same machine, same run, ratios.

Generates its inputs with qemu-img, converts each with both tools (alternating, N runs each, equally warm page
cache: the source is read once before every run), records wall time and peak RSS with GNU time, checks every
output with `qemu-img compare`, and prints a Markdown table of medians with imgshift/qemu-img ratios.

    python3 bench/bench.py                 # full matrix (long: tens of minutes on 2 cores)
    python3 bench/bench.py --quick         # inputs 1/8 the size, for a quick look
    python3 bench/bench.py --inputs sparse --sources qcow2 --outputs raw,qcow2

Inputs (each written by qemu-img as every source format):
    sparse        8 GiB virtual, ~1 GiB of random data in scattered extents plus allocated-but-zero regions
    dense         2 GiB of random data, every byte allocated
    compressible  2 GiB of text-like data with every 7th 16 MiB block zero (allocated)
    sparse64      64 GiB virtual, 256 MiB of data: peak memory must not follow the virtual size
                  (--quick keeps the 64 GiB virtual size and scales only the data)

Targets (ratios imgshift/qemu-img of median wall time): sparse inputs <= 0.7 for every output; compressed outputs
(qcow2 -c, vmdk streamOptimized) <= 0.55; dense inputs, uncompressed outputs: imgshift within 1.1x of
`cat SRC > /dev/null`; imgshift's peak RSS <= 64 MiB everywhere. The summary says which are met.
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

GiB = 1 << 30
MiB = 1 << 20

SOURCES = {  # name -> (qemu-img -O, -o)
    "qcow2": ("qcow2", []),
    "vmdk": ("vmdk", ["-o", "subformat=monolithicSparse"]),
    "vhdx": ("vhdx", []),
    "vpc": ("vpc", ["-o", "subformat=dynamic"]),
    "vdi": ("vdi", []),
}
OUTPUTS = {  # name -> convert args after -O
    "raw": ["-O", "raw"],
    "qcow2": ["-O", "qcow2"],
    "qcow2-c": ["-O", "qcow2", "-c"],
    "vmdk": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vhdx": ["-O", "vhdx"],
    "vpc": ["-O", "vpc"],
    "vdi": ["-O", "vdi"],
}
OUT_FMT = {"raw": "raw", "qcow2": "qcow2", "qcow2-c": "qcow2", "vmdk": "vmdk", "vmdk-stream": "vmdk",
           "vhdx": "vhdx", "vpc": "vpc", "vdi": "vdi"}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def make_raw(kind, path, scale):
    rnd = random.Random(1234)
    with open(path, "wb") as f:
        if kind in ("sparse", "sparse64"):
            size = 8 * GiB // scale if kind == "sparse" else 64 * GiB
            f.truncate(size)
            budget = GiB // scale if kind == "sparse" else 256 * MiB // scale
            while budget > 0:
                n = min(budget, rnd.choice([64 << 10, 256 << 10, MiB, 4 * MiB, 16 * MiB]))
                off = rnd.randrange(0, size - n) // 4096 * 4096
                f.seek(off)
                f.write(os.urandom(n))
                budget -= n
            for _ in range(16):  # allocated-but-zero regions
                off = rnd.randrange(0, size - 4 * MiB) // 4096 * 4096
                f.seek(off)
                f.write(bytes(4 * MiB))
        elif kind == "dense":
            size = 2 * GiB // scale
            for _ in range(size // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        elif kind == "compressible":
            size = 2 * GiB // scale
            words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
                     for _ in range(2000)]
            block = bytearray()
            while len(block) < 16 * MiB:
                line = b" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + b"\n"
                block += line
            block = bytes(block[:16 * MiB])
            for i in range(size // (16 * MiB)):
                f.write(bytes(16 * MiB) if i % 7 == 3 else block)
        else:
            raise ValueError(kind)


def timed(cmd):
    """Runs cmd under GNU time; returns (wall seconds, peak RSS KiB, user+sys CPU seconds)."""
    tfile = "/tmp/imgshift-bench-time"
    subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", tfile] + cmd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sec, rss, user, system = open(tfile).read().split()[-4:]
    return float(sec), int(rss), float(user) + float(system)


def disk_bytes(path):
    """Bytes a file occupies on disk (holes excluded)."""
    return os.stat(path).st_blocks * 512


def machine():
    """One line describing the machine: CPU, cores, memory, the work folder's disk, load."""
    cpu = platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = "%d GiB RAM" % round(int(line.split()[1]) / (1 << 20))
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem}, {platform.system()} {platform.release()}"


def disk_of(path):
    """The filesystem and block device under `path`."""
    r = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True)
    src, fstype = (r.stdout.split("\n")[1].split() + ["?", "?"])[:2] if r.returncode == 0 else ("?", "?")
    dev = os.path.basename(src)
    kind = ""
    try:
        rot = open(f"/sys/block/{dev}/queue/rotational").read().strip()
        kind = ", rotational" if rot == "1" else ", non-rotational"
        if dev.startswith("vd"):
            kind += " (virtio: the host's storage underneath)"
    except OSError:
        pass
    return f"{fstype} on {src}{kind}"


def loadavg():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="inputs 1/8 the size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--short-runs", type=int, default=7,
                    help=f"runs for cases whose first run took under {SHORT_CASE_S} s with both tools")
    ap.add_argument("--inputs", default="sparse,dense,compressible,sparse64")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--outputs", default=",".join(OUTPUTS))
    ap.add_argument("--workdir", default=None, help="inputs and outputs (default /var/tmp/imgshift-bench[-quick])")
    ap.add_argument("--imgshift", default=None, help="binary (default: build release)")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    a = ap.parse_args()
    scale = 8 if a.quick else 1
    load_start = loadavg()
    if a.workdir is None:
        a.workdir = "/var/tmp/imgshift-bench" + ("-quick" if a.quick else "")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = a.imgshift
    if exe is None:
        target = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/imgshift-target")
        sh(["cargo", "build", "--release", "--locked", "-q"], cwd=root, env=dict(os.environ, CARGO_TARGET_DIR=target))
        exe = os.path.join(target, "release", "imgshift")
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    stream_rows = []
    for kind in a.inputs.split(","):
        raw = os.path.join(a.workdir, f"{kind}.raw")
        if not os.path.exists(raw):
            print(f"generating {kind} input...", file=sys.stderr)
            make_raw(kind, raw, scale)
        for src_name in a.sources.split(","):
            fmt, opts = SOURCES[src_name]
            src = os.path.join(a.workdir, f"{kind}.{src_name}")
            if not os.path.exists(src):
                sh(["qemu-img", "convert", "-f", "raw", "-O", fmt] + opts + [raw, src])
            warm(src)
            cat_time = statistics.median(timed(["cat", src])[0] for _ in range(a.runs))
            if kind == "dense":
                stream_rows.append(stream_vs_cat(exe, kind, src_name, fmt, src, raw, cat_time, a.runs))
            for out_name in a.outputs.split(","):
                args = OUTPUTS[out_name]
                dst = {t: os.path.join(a.workdir, f"out.{t}.{out_name}") for t in ("qemu-img", "imgshift")}
                res = {"qemu-img": [], "imgshift": []}
                size = {}
                n_runs = a.runs
                run = 0
                while run < n_runs:
                    # Alternate which tool goes first, so neither always runs right after the page cache warm-up.
                    order = ("qemu-img", "imgshift") if run % 2 == 0 else ("imgshift", "qemu-img")
                    for tool in order:
                        if os.path.exists(dst[tool]):
                            os.remove(dst[tool])
                        warm(src)
                        cmd = ([exe, "convert", "-q"] if tool == "imgshift" else ["qemu-img", "convert"])
                        cmd += ["-f", fmt] + args + [src, dst[tool]]
                        res[tool].append(timed(cmd))
                        size[tool] = disk_bytes(dst[tool])
                        if run == 0:  # every run writes the same bytes; check one output per tool
                            ofmt = OUT_FMT[out_name]
                            r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", ofmt, src, dst[tool]],
                                               capture_output=True, text=True)
                            if r.returncode != 0:
                                sys.exit(f"{tool} produced a wrong {out_name} from {kind}.{src_name}: "
                                         f"{r.stdout}{r.stderr}")
                    if run == 0 and max(res["qemu-img"][0][0], res["imgshift"][0][0]) < SHORT_CASE_S:
                        # Short cases: this VM's memory-copy speed jumps between runs (the same `dd` of 1 GB
                        # takes 0.45 s or 2.4 s), so a median of 3 can flip; more runs cost little here.
                        n_runs = max(a.runs, a.short_runs)
                    run += 1
                for f in os.listdir(a.workdir):
                    if f.startswith("out."):
                        os.remove(os.path.join(a.workdir, f))
                q = statistics.median(t for t, _, _ in res["qemu-img"])
                i = statistics.median(t for t, _, _ in res["imgshift"])
                row = {
                    "input": kind, "source": src_name, "output": out_name,
                    "qemu_s": q, "imgshift_s": i, "ratio": i / q if q > 0 else float("nan"),
                    "qemu_cpu_s": statistics.median(c for _, _, c in res["qemu-img"]),
                    "imgshift_cpu_s": statistics.median(c for _, _, c in res["imgshift"]),
                    "qemu_rss_kib": max(m for _, m, _ in res["qemu-img"]),
                    "imgshift_rss_kib": max(m for _, m, _ in res["imgshift"]),
                    "size_ratio": size["imgshift"] / size["qemu-img"] if size["qemu-img"] else float("nan"),
                    "cat_s": cat_time,
                    "runs": {t: res[t] for t in res},
                }
                rows.append(row)
                print(fmt_row(row), file=sys.stderr)
    text = report(rows, stream_rows, a, scale, load_start, exe)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Benchmark results\n\nMade by `python3 bench/bench.py" + (" --quick" if a.quick else "")
                    + "`.\n\n" + text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def sha256_of(cmd, limit=None):
    """SHA-256 of a command's standard output, or of its first `limit` bytes, the rest having to be zeros (a VHD's
    virtual size is rounded up to its CHS geometry, so its disk can be longer than the raw input)."""
    h = hashlib.sha256()
    seen = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as p:
        while True:
            b = p.stdout.read(4 * MiB)
            if not b:
                break
            if limit is not None and seen + len(b) > limit:
                head, tail = b[:max(0, limit - seen)], b[max(0, limit - seen):]
                if tail.count(0) != len(tail):
                    return None
                b = head
            h.update(b)
            seen += len(b)
    if p.returncode != 0:
        sys.exit(f"{cmd} failed")
    return h.hexdigest()


def stream_vs_cat(exe, kind, src_name, fmt, src, raw, cat_time, runs):
    """The dense target: `imgshift convert -O raw SRC -` into /dev/null (the streaming path that feeds an upload or
    a pipe, with no output file) against `cat SRC`, both with the source warm; the stream is checked against the
    raw input's SHA-256 once."""
    cmd = [exe, "convert", "-q", "-f", fmt, "-O", "raw", src, "-"]
    if sha256_of(cmd, os.path.getsize(raw)) != sha256_of(["cat", raw]):
        sys.exit(f"imgshift streamed wrong bytes from {kind}.{src_name}")
    times = []
    for _ in range(runs):
        warm(src)
        times.append(timed(cmd)[0])
    row = {"input": kind, "source": src_name, "stream_s": statistics.median(times), "cat_s": cat_time}
    print("| %s | %s | stream %.2f s | cat %.2f s |" % (kind, src_name, row["stream_s"], cat_time), file=sys.stderr)
    return row


def fmt_row(r):
    return ("| %s | %s | %s | %.2f | %.2f | **%.2f** | %.2f | %.2f | %.0f | %.0f | %.2f |"
            % (r["input"], r["source"], r["output"], r["qemu_s"], r["imgshift_s"], r["ratio"],
               r["qemu_cpu_s"], r["imgshift_cpu_s"], r["qemu_rss_kib"] / 1024, r["imgshift_rss_kib"] / 1024,
               r["size_ratio"]))


COMPRESSED = ("qcow2-c", "vmdk-stream")
SHORT_CASE_S = 3.0


def report(rows, stream_rows, a, scale, load_start, exe):
    lines = [
        f"- Machine: {machine()}; work folder {a.workdir}: {disk_of(a.workdir)}.",
        f"- Date {time.strftime('%Y-%m-%d')}; scale 1/{scale}; {a.runs} runs of each tool per case ({a.short_runs} "
        f"where the first run took under {SHORT_CASE_S:g} s), alternating "
        "(the first tool changes every run); load average {} at the start, {} at the end.".format(
            load_start, loadavg()),
        "- Page cache: warm for both tools (the source is read once right before every run; outputs are "
        "removed before every run). Times are medians of wall-clock seconds (GNU time); CPU = user + sys; "
        "peak RSS is the largest of the runs. Every output was checked with `qemu-img compare` against the "
        "source.",
        f"- imgshift: `{os.path.basename(exe)} convert -q` with its defaults; qemu-img "
        f"{qemu_version()}: `qemu-img convert` with its defaults.",
        "",
        "| input | source | output | qemu-img s | imgshift s | ratio | qemu-img CPU s | imgshift CPU s "
        "| qemu-img RSS MiB | imgshift RSS MiB | size ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [fmt_row(r) for r in rows]
    lines += ["", "Size ratio: bytes the output occupies on disk, imgshift/qemu-img.", "", "## Summary", ""]

    def summary(name, rs, target):
        if not rs:
            return
        ratios = [r["ratio"] for r in rs if r["ratio"] > 0]
        worst = max(rs, key=lambda r: r["ratio"])
        verdict = "met" if worst["ratio"] <= target else "**not met**"
        lines.append(f"- **{name}** ({len(rs)} cases): geometric-mean ratio {statistics.geometric_mean(ratios):.2f}, "
                     f"worst {worst['ratio']:.2f} ({worst['source']} -> {worst['output']}); target <= {target}: "
                     f"{verdict}")

    for kind in ("sparse", "sparse64"):
        summary(f"{kind} inputs, every output", [r for r in rows if r["input"] == kind], 0.7)
    summary("compressed outputs (qcow2 -c, vmdk streamOptimized), every input",
            [r for r in rows if r["output"] in COMPRESSED], 0.55)
    for kind in dict.fromkeys(r["input"] for r in rows):
        if kind in ("sparse", "sparse64"):
            continue
        summary(f"{kind} inputs, uncompressed outputs (for information)",
                [r for r in rows if r["input"] == kind and r["output"] not in COMPRESSED], float("inf"))
    if stream_rows:
        vs = [(r["stream_s"] / r["cat_s"], r) for r in stream_rows if r["cat_s"] > 0]
        worst, wr = max(vs, key=lambda x: x[0])
        lines.append("- **dense inputs, `imgshift convert -O raw SRC -` into /dev/null vs `cat SRC > /dev/null`** "
                     "(the streaming path, no output file): " + ", ".join(
                         "%s %.2fx (%.2f s vs %.2f s)" % (r["source"], v, r["stream_s"], r["cat_s"]) for v, r in vs)
                     + f"; worst {worst:.2f}x ({wr['source']}); target <= 1.1x: "
                     + ("met" if worst <= 1.1 else "**not met**"))
    dense = [r for r in rows if r["input"] == "dense" and r["output"] not in COMPRESSED and r["cat_s"] > 0]
    if dense:
        vs_cat = [(r["imgshift_s"] / r["cat_s"], r) for r in dense]
        worst, wr = max(vs_cat, key=lambda x: x[0])
        lines.append("- **dense inputs, output files vs `cat SRC > /dev/null`** (uncompressed outputs): geometric mean "
                     f"{statistics.geometric_mean([v for v, _ in vs_cat]):.2f}x, worst {worst:.2f}x "
                     f"({wr['source']} -> {wr['output']}); target <= 1.1x: {'met' if worst <= 1.1 else '**not met**'}")
        lines.append("  - per source, raw output: " + ", ".join(
            "%s %.2fx (cat %.2f s)" % (r["source"], r["imgshift_s"] / r["cat_s"], r["cat_s"])
            for r in dense if r["output"] == "raw"))
    comp = [r for r in rows if r["output"] in COMPRESSED]
    if comp:
        lines.append("- compressed output size, imgshift/qemu-img: " + ", ".join(
            "%s %.3f-%.3f" % (o, min(r["size_ratio"] for r in comp if r["output"] == o),
                              max(r["size_ratio"] for r in comp if r["output"] == o))
            for o in COMPRESSED if any(r["output"] == o for r in comp)))
    worst_rss = max(rows, key=lambda r: r["imgshift_rss_kib"])
    lines.append("- **peak RSS**: imgshift max %.1f MiB (%s %s -> %s), qemu-img max %.1f MiB; target <= 64 MiB: %s"
                 % (worst_rss["imgshift_rss_kib"] / 1024, worst_rss["input"], worst_rss["source"],
                    worst_rss["output"], max(r["qemu_rss_kib"] for r in rows) / 1024,
                    "met" if worst_rss["imgshift_rss_kib"] <= 64 * 1024 else "**not met**"))
    return "\n".join(lines)


def qemu_version():
    r = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True)
    words = r.stdout.split()
    return words[2] if len(words) > 2 else "?"


if __name__ == "__main__":
    main()
