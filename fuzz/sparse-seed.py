#!/usr/bin/env python3
"""Encodes an image file as a sparse fuzz input (the encoding `imgshift_fuzz::run_sparse` reads).

Output: [u32 LE file length] then records [u32 LE offset][u16 LE length][bytes], one per run of non-zero
512-byte sectors. Each run keeps at most KEEP bytes (default 4096): headers, tables and metadata are short, and
the tail of a data block reads back as zeros, which is still a valid image. A 4 MiB VHDX becomes a few KiB.

Usage: sparse-seed.py IN OUT [KEEP]
"""
import struct
import sys

SECTOR = 512


def main():
    src, dst = sys.argv[1], sys.argv[2]
    keep = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    data = open(src, "rb").read()
    if len(data) >= 1 << 32:
        sys.exit("sparse-seed: input larger than 4 GiB")
    out = bytearray(struct.pack("<I", len(data)))
    zero = bytes(SECTOR)
    pos = 0
    while pos < len(data):
        if data[pos:pos + SECTOR] == zero[:len(data[pos:pos + SECTOR])]:
            pos += SECTOR
            continue
        end = pos
        while end < len(data) and data[end:end + SECTOR] != zero[:len(data[end:end + SECTOR])]:
            end += SECTOR
        end = min(end, len(data))
        chunk = data[pos:min(end, pos + keep)].rstrip(b"\0")
        for i in range(0, len(chunk), 0xFFFF):
            piece = chunk[i:i + 0xFFFF]
            out += struct.pack("<IH", pos + i, len(piece)) + piece
        pos = end
    open(dst, "wb").write(out)


if __name__ == "__main__":
    main()
