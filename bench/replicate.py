#!/usr/bin/env python3
"""Replication bench (issue 23): for a 1 GiB guest disk holding ~300 MB of data, the first `imgshift replicate`
run and a second one after 1 % of the blocks changed, per target, next to a full re-copy of the changed disk in
the same run (the usual way without replication: copy it all again). Prints a Markdown table: wall time, bytes
read from the source and bytes sent to the target.

Targets: file (a folder), libvirt (a pool on the private libvirtd of `.ci/standins start`), aws (moto, with its
EBS model corrected by tests/standins/moto_launcher.py). Stand-in addresses come from
/var/tmp/imgshift-standins/standins.env, as for the tests.

    python3 bench/replicate.py [--imgshift target/release/imgshift] [--targets file,libvirt,aws]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
MIB = 1 << 20
BLOCK = 512 * 1024


def standins():
    env = {}
    try:
        with open("/var/tmp/imgshift-standins/standins.env") as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k:
                    env[k] = v
    except FileNotFoundError:
        sys.exit("stand-ins not started: run `bash .ci/standins start`")
    return env


def make_disk(path, rng):
    """1 GiB sparse raw with 300 chunks of 1 MiB of random data spread over it (~300 MB)."""
    with open(path, "wb") as f:
        f.truncate(GIB)
        for i in range(300):
            f.seek(i * (GIB // 300) // MIB * MIB)
            f.write(rng.randbytes(MIB))


def change(path, rng, fraction=0.01):
    """Rewrites 64 KiB in `fraction` of the 512 KiB blocks (some of them zeroed)."""
    blocks = rng.sample(range(GIB // BLOCK), int(GIB // BLOCK * fraction))
    with open(path, "r+b") as f:
        for n, b in enumerate(blocks):
            f.seek(b * BLOCK + 128 * 1024)
            f.write(bytes(64 * 1024) if n % 5 == 0 else rng.randbytes(64 * 1024))
    return len(blocks)


def run(cmd, env):
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr}")
    return wall, r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imgshift", default="target/release/imgshift")
    ap.add_argument("--targets", default="file,libvirt,aws")
    a = ap.parse_args()
    exe = os.path.abspath(a.imgshift)
    st = standins()
    rng = random.Random(23)
    work = tempfile.mkdtemp(prefix="imgshift-repbench", dir="/var/tmp")
    os.chmod(work, 0o755)
    rows = []
    try:
        for target in a.targets.split(","):
            d = os.path.join(work, target)
            os.makedirs(d)
            os.chmod(d, 0o755)
            src = os.path.join(d, "guest.raw")
            make_disk(src, random.Random(23))
            env = dict(os.environ)
            state = os.path.join(d, "state")
            base = [exe, "replicate", src, "-f", "raw", "--name", f"bench-{target}-{os.getpid()}",
                    "--state-dir", state, "--output", "json", "--to", target]
            full = None
            if target == "file":
                pts = os.path.join(d, "points")
                os.makedirs(pts)
                base += ["--dir", pts]
                full = [exe, "convert", "-O", "qcow2", "-f", "raw", src, os.path.join(d, "full.qcow2")]
            elif target == "libvirt":
                uri = st["IMGSHIFT_LIBVIRT_URI"]
                pool = f"repbench{os.getpid()}"
                pdir = os.path.join(d, "pool")
                os.makedirs(pdir)
                os.chmod(pdir, 0o755)
                subprocess.run(["virsh", "-c", uri, "pool-create-as", pool, "dir", "--target", pdir], check=True,
                               capture_output=True)
                base += ["-c", uri, "--pool", pool]
                full = [exe, "upload", "libvirt", src, "-f", "raw", "-c", uri, "--pool", pool, "--volume", "full.qcow2"]
            elif target == "aws":
                env.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true"})
                ep = st["IMGSHIFT_MOTO_URL"]
                base += ["--endpoint-url", ep]
                full = [exe, "upload", "aws", src, "-f", "raw", "--snapshot-only", "--endpoint-url", ep,
                        "--state-dir", os.path.join(d, "jobs"), "--output", "json"]
            w1, o1 = run(base, env)
            j1 = json.loads(o1)
            n = change(src, rng)
            w2, o2 = run(base, env)
            j2 = json.loads(o2)
            wf, _ = run(full, env)
            rows.append((target, w1, j1, w2, j2, n, wf))
            if target == "libvirt":
                subprocess.run(["virsh", "-c", st["IMGSHIFT_LIBVIRT_URI"], "pool-destroy", pool], capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = lambda b: f"{b / 1e6:.1f} MB"
    print("| target | run 1 (full): wall, read, sent | run 2 (1 % changed): wall, read, sent, detection | full re-copy "
          "of the changed disk: wall | run 2 / re-copy |")
    print("|---|---|---|---|---|")
    for target, w1, j1, w2, j2, n, wf in rows:
        print(f"| {target} | {w1:.2f} s, {mb(j1['bytes_read'])}, {mb(j1['sent_bytes'])} | {w2:.2f} s, "
              f"{mb(j2['bytes_read'])}, {mb(j2['sent_bytes'])} ({n} blocks changed), {j2['detection']} | {wf:.2f} s "
              f"| {w2 / wf:.2f}x time |")


if __name__ == "__main__":
    main()
