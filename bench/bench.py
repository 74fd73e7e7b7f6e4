#!/usr/bin/env python3
"""Side-by-side benchmark: imgshift convert vs qemu-img convert, same machine, same run, ratios.

Generates its inputs with qemu-img, converts each with both tools (alternating, N runs each, equally warm page
cache: the source is read once before every run), records wall time and peak RSS with GNU time, checks every
output with `qemu-img compare`, and prints a Markdown table of medians with imgshift/qemu-img ratios.

    python3 bench/bench.py                 # full matrix (long: tens of minutes on 2 cores)
    python3 bench/bench.py --quick         # inputs 1/8 the size, for a quick look
    python3 bench/bench.py --inputs sparse --sources qcow2 --outputs raw,qcow2
"""
import argparse
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
        if kind == "sparse":
            size = 8 * GiB // scale
            f.truncate(size)
            budget = GiB // scale
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
    """Runs cmd under GNU time; returns (seconds, peak RSS KiB)."""
    tfile = "/tmp/imgshift-bench-time"
    subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tfile] + cmd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sec, rss = open(tfile).read().split()[-2:]
    return float(sec), int(rss)


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="inputs 1/8 the size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--inputs", default="sparse,dense,compressible")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--outputs", default=",".join(OUTPUTS))
    ap.add_argument("--workdir", default="/var/tmp/imgshift-bench")
    ap.add_argument("--imgshift", default=None, help="binary (default: build release)")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    a = ap.parse_args()
    scale = 8 if a.quick else 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = a.imgshift
    if exe is None:
        target = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/imgshift-target")
        sh(["cargo", "build", "--release", "--locked", "-q"], cwd=root, env=dict(os.environ, CARGO_TARGET_DIR=target))
        exe = os.path.join(target, "release", "imgshift")
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    for kind in a.inputs.split(","):
        raw = os.path.join(a.workdir, f"{kind}.raw")
        if not os.path.exists(raw):
            print(f"generating {kind} input...", file=sys.stderr)
            make_raw(kind, raw, scale)
        warm(raw)
        cat_time = min(timed(["cat", raw])[0] for _ in range(a.runs))
        for src_name in a.sources.split(","):
            fmt, opts = SOURCES[src_name]
            src = os.path.join(a.workdir, f"{kind}.{src_name}")
            if not os.path.exists(src):
                sh(["qemu-img", "convert", "-f", "raw", "-O", fmt] + opts + [raw, src])
            for out_name in a.outputs.split(","):
                args = OUTPUTS[out_name]
                dst = os.path.join(a.workdir, f"out.{out_name}")
                res = {"qemu-img": [], "imgshift": []}
                for _ in range(a.runs):
                    for tool in ("qemu-img", "imgshift"):
                        if os.path.exists(dst):
                            os.remove(dst)
                        warm(src)
                        cmd = ([exe, "convert", "-q"] if tool == "imgshift" else ["qemu-img", "convert"])
                        cmd += ["-f", fmt] + args + [src, dst]
                        res[tool].append(timed(cmd))
                        ofmt = OUT_FMT[out_name]
                        r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", ofmt, src, dst],
                                           capture_output=True, text=True)
                        if r.returncode != 0:
                            sys.exit(f"{tool} produced a wrong {out_name} from {kind}.{src_name}: {r.stdout}{r.stderr}")
                for f in os.listdir(a.workdir):
                    if f.startswith("out."):
                        os.remove(os.path.join(a.workdir, f))
                q = statistics.median(t for t, _ in res["qemu-img"])
                i = statistics.median(t for t, _ in res["imgshift"])
                qr = max(m for _, m in res["qemu-img"])
                ir = max(m for _, m in res["imgshift"])
                row = (kind, src_name, out_name, q, i, i / q if q > 0 else float("nan"), qr, ir, cat_time)
                rows.append(row)
                print("| %s | %s | %s | %.2f | %.2f | **%.2f** | %d | %d |" % row[:8], file=sys.stderr)
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, {platform.platform()}; "
        f"date {time.strftime('%Y-%m-%d')}; scale 1/{scale}; {a.runs} runs each, alternating; "
        "page cache equally warm for both tools (the source is read once before every run).",
        "",
        "| input | source | output | qemu-img s | imgshift s | ratio | qemu-img peak RSS KiB | imgshift peak RSS KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| %s | %s | %s | %.2f | %.2f | **%.2f** | %d | %d |" % r[:8])
    lines.append("")
    for kind in dict.fromkeys(r[0] for r in rows):
        rs = [r for r in rows if r[0] == kind]
        geo = statistics.geometric_mean([r[5] for r in rs if r[5] > 0])
        worst = max(r[5] for r in rs)
        extra = ""
        if kind == "dense":
            extra = "; imgshift / `cat SRC` (raw output): " + ", ".join(
                "%s %.2f" % (r[1], r[4] / r[8]) for r in rs if r[2] == "raw" and r[8] > 0)
        lines.append(f"- **{kind}**: geometric-mean ratio {geo:.2f}, worst {worst:.2f}{extra}")
    comp = [r for r in rows if r[2] in ("qcow2-c", "vmdk-stream")]
    if comp:
        lines.append("- **compressed outputs**: geometric-mean ratio %.2f, worst %.2f"
                     % (statistics.geometric_mean([r[5] for r in comp]), max(r[5] for r in comp)))
    lines.append("- peak RSS: imgshift max %d KiB, qemu-img max %d KiB" % (max(r[7] for r in rows), max(r[6] for r in rows)))
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Benchmark results\n\nMade by `python3 bench/bench.py`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
