#!/usr/bin/env python3
"""Packs a qemu-img VHDX into the smallest file the format allows, as a fuzz seed.

qemu puts the log, BAT, metadata and every payload block on their own 1 MiB boundaries with gaps, so its
smallest images are 8-9 MiB, and every fuzz execution copies the whole input (twice). This keeps the same
headers, BAT and metadata but drops the (empty) log and lays the rest out back to back: the 1 MiB header
section, the BAT region, the metadata region, then the present payload blocks. An empty disk becomes 3 MiB, a
disk with one allocated 1 MiB block 4 MiB. Checksums (CRC-32C) are recomputed.

Usage: compact-vhdx.py IN.vhdx OUT.vhdx
"""
import struct
import sys

MIB = 1 << 20
BAT_GUID = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")
META_GUID = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")
FULLY_PRESENT, PARTIALLY_PRESENT = 6, 7


def crc32c(data: bytes) -> int:
    table = crc32c.table
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c.table = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    crc32c.table.append(c)


def seal(buf: bytearray, start: int, size: int) -> None:
    """Recomputes the CRC-32C at start+4 over size bytes (the field itself counted as zero)."""
    buf[start + 4 : start + 8] = b"\0\0\0\0"
    struct.pack_into("<I", buf, start + 4, crc32c(bytes(buf[start : start + size])))


def main(src: str, dst: str) -> None:
    d = open(src, "rb").read()
    out = bytearray(d[:MIB])
    # Both headers: no log (zero GUID, zero length; the offset stays a valid 1 MiB multiple).
    for off in (64 << 10, 128 << 10):
        assert out[off : off + 4] == b"head"
        assert out[off + 48 : off + 64] == bytes(16), "the log must be empty"
        struct.pack_into("<IQ", out, off + 68, 0, MIB)
        seal(out, off, 4096)
    regions = {}
    rt = 192 << 10
    (count,) = struct.unpack_from("<I", out, rt + 8)
    for i in range(count):
        guid, fo, ln = struct.unpack_from("<16sQI", out, rt + 16 + 32 * i)
        regions[guid] = (i, fo, ln)
    bat_i, bat_off, bat_len = regions[BAT_GUID]
    meta_i, meta_off, meta_len = regions[META_GUID]
    new_bat, new_meta = MIB, MIB + bat_len
    data_at = new_meta + meta_len
    bat = bytearray(d[bat_off : bat_off + bat_len])
    blocks = []
    for e in range(bat_len // 8):
        (v,) = struct.unpack_from("<Q", bat, 8 * e)
        if v & 7 in (FULLY_PRESENT, PARTIALLY_PRESENT):
            old = (v >> 20) * MIB
            blocks.append(old)
            struct.pack_into("<Q", bat, 8 * e, (v & (MIB - 1)) | ((data_at // MIB + len(blocks) - 1) << 20))
    block_size = None
    if blocks:
        # File parameters item: the block size (metadata table entries are 32 bytes from offset 32).
        meta = d[meta_off : meta_off + meta_len]
        (n,) = struct.unpack_from("<H", meta, 10)
        for i in range(n):
            guid, o, _ = struct.unpack_from("<16sII", meta, 32 + 32 * i)
            if guid == bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b"):
                (block_size,) = struct.unpack_from("<I", meta, o)
    for t in (192 << 10, 256 << 10):
        struct.pack_into("<Q", out, t + 16 + 32 * bat_i + 16, new_bat)
        struct.pack_into("<Q", out, t + 16 + 32 * meta_i + 16, new_meta)
        seal(out, t, 64 << 10)
    out += bat
    out += d[meta_off : meta_off + meta_len]
    for old in blocks:
        out += d[old : old + block_size].ljust(block_size, b"\0")
    open(dst, "wb").write(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
