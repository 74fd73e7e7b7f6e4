#!/usr/bin/env python3
"""Builds the malformed-image corpus: valid images made by qemu-img, each copy with ONE field mutated (and the
checksum that covers it recomputed, so the mutation reaches the rule it targets rather than the checksum test).

Usage: tests/corpus/make-corpus.py OUT_DIR

Writes OUT_DIR/<case> files and OUT_DIR/manifest.tsv, one line per case:
    file <TAB> format <TAB> commands <TAB> expected error substring
`commands` is `both` (convert and info must fail) or `convert` (only reading the data can notice: info maps the
image but never decompresses or follows the broken thing). Nothing is committed; tests/corpus.rs runs this at
test time. Needs qemu-img and qemu-io (qemu-utils).
"""

import io
import os
import struct
import subprocess
import sys
import tarfile
import tempfile

OUT = sys.argv[1] if len(sys.argv) > 1 else "corpus-out"
os.makedirs(OUT, exist_ok=True)
WORK = tempfile.mkdtemp(prefix="imgshift-corpus-")
MANIFEST = []


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def base(fmt, name, size, opts="", writes=("write -P 0xab 0 64k", "write -P 0x5a 1M 64k")):
    """A qemu-img image with some data; returns its bytes."""
    path = os.path.join(WORK, name)
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    run(*args, path, size)
    if writes:
        cmd = ["qemu-io", "-f", fmt]
        for w in writes:
            cmd += ["-c", w]
        run(*cmd, path)
    with open(path, "rb") as f:
        return bytearray(f.read())


def case(name, fmt, data, expect, commands="both"):
    assert "\t" not in expect and "\n" not in expect
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes(data))
    MANIFEST.append((name, fmt, commands, expect))


def put(data, off, fmt, value):
    """Returns a copy of `data` with struct `fmt` packed at `off`."""
    d = bytearray(data)
    struct.pack_into(fmt, d, off, value)
    return d


def get(data, off, fmt):
    return struct.unpack_from(fmt, data, off)[0]


# --------------------------------------------------------------------------------------------------- qcow2
# Header (qcow2.txt "Header"): magic 0, version 4, backing_file_offset 8, backing_file_size 16, cluster_bits 20,
# size 24, crypt_method 32, l1_size 36, l1_table_offset 40, refcount_table_offset 48, refcount_table_clusters 56,
# nb_snapshots 60, snapshots_offset 64, incompatible 72, compatible 80, autoclear 88, refcount_order 96,
# header_length 100, compression_type 104.
q = base("qcow2", "q.qcow2", "4M", "cluster_size=65536")
l1_off = get(q, 40, ">Q")
l2_off = get(q, l1_off, ">Q") & 0x00FFFFFFFFFFFE00
case("qcow2-magic", "qcow2", put(q, 0, ">I", 0x51464900), "bad magic")
case("qcow2-version-1", "qcow2", put(q, 4, ">I", 1), "version 1 is the old qcow format")
case("qcow2-version-4", "qcow2", put(q, 4, ">I", 4), "version 4")
case("qcow2-cluster-bits-8", "qcow2", put(q, 20, ">I", 8), "cluster_bits 8 is outside")
case("qcow2-cluster-bits-30", "qcow2", put(q, 20, ">I", 30), "cluster_bits 30 is outside")
case("qcow2-crypt-aes", "qcow2", put(q, 32, ">I", 1), "encrypted images are not supported")
case("qcow2-crypt-luks", "qcow2", put(q, 32, ">I", 2), "LUKS")
case("qcow2-size-2-62", "qcow2", put(q, 24, ">Q", 1 << 62), "needs an L1 table above qemu's 32 MiB limit")
case("qcow2-l1-size-0", "qcow2", put(q, 36, ">I", 0), "the L1 table has 0 entries")
case("qcow2-l1-size-2-31", "qcow2", put(q, 36, ">I", 1 << 31), "above qemu's 32 MiB L1 limit")
case("qcow2-l1-unaligned", "qcow2", put(q, 40, ">Q", l1_off + 8), "L1 table offset 0x30008 is not cluster aligned")
case("qcow2-l1-past-eof", "qcow2", put(q, 40, ">Q", 1 << 40), "extends past the end of the file")
case("qcow2-reftable-clusters-0", "qcow2", put(q, 56, ">I", 0), "the image has no refcount table")
case("qcow2-reftable-huge", "qcow2", put(q, 56, ">I", 1 << 20), "above qemu's 8 MiB limit")
case("qcow2-reftable-unaligned", "qcow2", put(q, 48, ">Q", 0x10200), "refcount table offset 0x10200 is not cluster aligned")
case("qcow2-refcount-order-7", "qcow2", put(q, 96, ">I", 7), "refcount_order 7 is above 6")
case("qcow2-header-length-100", "qcow2", put(q, 100, ">I", 100), "header_length 100 is below 104")
case("qcow2-header-length-huge", "qcow2", put(q, 100, ">I", 1 << 20), "exceeds the cluster size")
case("qcow2-incompat-unknown", "qcow2", put(q, 72, ">Q", 1 << 9), "unknown incompatible features")
case("qcow2-incompat-data-file", "qcow2", put(q, 72, ">Q", 1 << 2), "external data files are not supported")
case("qcow2-incompat-compression", "qcow2", put(q, 72, ">Q", 1 << 3), "compression type bit is set but compression_type is 0")
case("qcow2-compression-type-2", "qcow2", put(q, 104, ">B", 2), "compression_type 2 without the compression type feature bit")
case("qcow2-backing-offset-outside", "qcow2", put(q, 8, ">Q", 1 << 20), "outside the first cluster")
qb = put(q, 8, ">Q", 0x1000)
qb = put(qb, 16, ">I", 2000)
case("qcow2-backing-name-long", "qcow2", qb, "longer than 1023")
case("qcow2-l2-offset-past-eof", "qcow2", put(q, l1_off, ">Q", (1 << 63) | (1 << 40)), "past the end of the file")
case("qcow2-l2-offset-unaligned", "qcow2", put(q, l1_off, ">Q", (1 << 63) | (l2_off + 512)), "is not cluster aligned (L1 index 0)")
case("qcow2-data-past-eof", "qcow2", put(q, l2_off, ">Q", (1 << 63) | (1 << 40)), "data cluster at 0x10000000000 is past the end of the file")
case("qcow2-data-unaligned", "qcow2", put(q, l2_off, ">Q", (1 << 63) | 0x50200), "data cluster offset 0x50200 is not cluster aligned")
case("qcow2-truncated-header", "qcow2", q[:50], "shorter than the 72-byte header")
# An extension whose length runs past the extension area (the end-of-extensions marker follows the header).
hl = get(q, 100, ">I")
qe = put(q, hl, ">I", 0x12345678)
case("qcow2-extension-overrun", "qcow2", put(qe, hl + 4, ">I", 0x10000), "past the extension area")
# v2 image with the (v3-only) zero flag in an L2 entry.
q2 = base("qcow2", "q2.qcow2", "4M", "cluster_size=65536,compat=0.10")
q2_l2 = get(q2, get(q2, 40, ">Q"), ">Q") & 0x00FFFFFFFFFFFE00
case("qcow2-v2-zero-flag", "qcow2", put(q2, q2_l2, ">Q", 1), "zero cluster flag in a version 2 image")
# A compressed cluster whose deflate data is garbage: only a read notices.
run("qemu-img", "convert", "-q", "-c", "-O", "qcow2", os.path.join(WORK, "q.qcow2"), os.path.join(WORK, "qc.qcow2"))
qc = bytearray(open(os.path.join(WORK, "qc.qcow2"), "rb").read())
qc_l2 = get(qc, get(qc, 40, ">Q"), ">Q") & 0x00FFFFFFFFFFFE00
qc_entry = get(qc, qc_l2, ">Q")
qc_data = qc_entry & ((1 << 54) - 1)  # cluster_bits 16: offset mask is 62 - (16 - 8) = 54 bits
case("qcow2-compressed-garbage", "qcow2", put(qc, qc_data, ">Q", 0xFFFFFFFFFFFFFFFF), "compressed cluster", "convert")
# A backing file whose format extension was renamed to an unknown type: the format is no longer recorded.
run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "q.qcow2", "-F", "qcow2", os.path.join(WORK, "qbk.qcow2"))
qk = bytearray(open(os.path.join(WORK, "qbk.qcow2"), "rb").read())
hl = get(qk, 100, ">I")
assert get(qk, hl, ">I") == 0xE2792ACA
case("qcow2-backing-without-format", "qcow2", put(qk, hl, ">I", 0x0BADF00D), "has no recorded format")

# ----------------------------------------------------------------------------------------------------- vpc
# Footer (VHD spec "Hard Disk Footer Format"): cookie 0, features 8, version 12, data_offset 16, timestamp 24,
# creator 28, creator version 32, creator OS 36, original size 40, current size 48, geometry 56, disk type 60,
# checksum 64 (one's complement of the byte sum), uuid 68, saved state 84.
def vhd_sum(b, skip_at):
    return (~sum(x for i, x in enumerate(b) if not skip_at <= i < skip_at + 4)) & 0xFFFFFFFF


def vhd_footer(data, off, fmt, value):
    """Mutates a footer field in every footer copy (offset 0 of dynamic disks, and the end) and re-sums."""
    d = bytearray(data)
    starts = [len(d) - 512]
    if d[:8] == b"conectix":
        starts.append(0)
    for s in starts:
        struct.pack_into(fmt, d, s + off, value)
        struct.pack_into(">I", d, s + 64, vhd_sum(d[s : s + 512], 64))
    return d


def vhd_dyn(data, off, fmt, value):
    """Mutates a dynamic header field (header at offset 512, 1024 bytes, checksum at 36) and re-sums."""
    d = bytearray(data)
    struct.pack_into(fmt, d, 512 + off, value)
    struct.pack_into(">I", d, 512 + 36, vhd_sum(d[512:1536], 36))
    return d


vf = base("vpc", "vf.vhd", "4M", "subformat=fixed")
vd = base("vpc", "vd.vhd", "8M", "subformat=dynamic")
case("vpc-fixed-cookie", "vpc", vhd_footer(vf, 0, "8s", b"notavhd!"), "footer cookie is not 'conectix'")
bad_sum = bytearray(vf)
bad_sum[-512 + 64] ^= 0xFF
case("vpc-fixed-checksum", "vpc", bad_sum, "checksum")
case("vpc-fixed-version", "vpc", vhd_footer(vf, 12, ">I", 0x00020000), "version")
case("vpc-fixed-disk-type", "vpc", vhd_footer(vf, 60, ">I", 5), "disk type")
# qemu sizes "qemu"-created disks by CHS geometry (65535/16/255 means "use current_size"): grow the geometry.
case("vpc-fixed-geometry-larger-than-file", "vpc", vhd_footer(vf, 56, ">I", 0xFFFF10FE), "fixed disk declares")
case("vpc-dyn-cookie", "vpc", vhd_dyn(vd, 0, "8s", b"notspars"), "cxsparse")
case("vpc-dyn-data-offset-past-eof", "vpc", vhd_footer(vd, 16, ">Q", 1 << 40), "past the end")
case("vpc-dyn-header-version", "vpc", vhd_dyn(vd, 24, ">I", 0x00020000), "version")
case("vpc-dyn-block-size", "vpc", vhd_dyn(vd, 32, ">I", 3000), "block size")
case("vpc-dyn-max-entries-huge", "vpc", vhd_dyn(vd, 28, ">I", 0xFFFFFFFF), "entries")
case("vpc-dyn-bat-past-eof", "vpc", vhd_dyn(vd, 16, ">Q", 1 << 40), "past the end")
bat = get(vd, 512 + 16, ">Q")
case("vpc-dyn-block-past-eof", "vpc", put(vd, bat, ">I", 0x10000000), "past the end")
case("vpc-dyn-bat-shared-block", "vpc", put(vd, bat + 4, ">I", get(vd, bat, ">I")), "share the block at sector")
vdiff = vhd_footer(vd, 60, ">I", 4)
case("vpc-dyn-differencing-without-parent", "vpc", vdiff, "parent")
case("vpc-truncated", "vpc", vf[:300], "shorter")

# ---------------------------------------------------------------------------------------------------- vhdx
# MS-VHDX: file identifier at 0; headers at 64 KiB and 128 KiB (signature 0, CRC-32C 4, sequence 8, GUIDs 16/32,
# log GUID 48, log version 64, version 66, log length 68, log offset 72); region tables at 192 KiB and 256 KiB
# (signature 0, CRC-32C 4, entry count 8, entries from 16: GUID 16, offset 8, length 4, required 4); the
# metadata region (no checksum) holds a table of items.
def crc32c(b):
    crc = 0xFFFFFFFF
    for x in b:
        crc ^= x
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def vhdx_fix(d, start, size):
    struct.pack_into("<I", d, start + 4, 0)
    struct.pack_into("<I", d, start + 4, crc32c(bytes(d[start : start + size])))


def vhdx_header(data, off, fmt, value):
    d = bytearray(data)
    for h in (64 << 10, 128 << 10):
        struct.pack_into(fmt, d, h + off, value)
        vhdx_fix(d, h, 4096)
    return d


def vhdx_region(data, off, fmt, value):
    d = bytearray(data)
    for r in (192 << 10, 256 << 10):
        struct.pack_into(fmt, d, r + off, value)
        vhdx_fix(d, r, 64 << 10)
    return d


def guid(s):
    import uuid

    return uuid.UUID(s).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
META_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
LOGICAL_SECTOR = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")


def vhdx_regions(d):
    out = {}
    rt = 192 << 10
    for i in range(get(d, rt + 8, "<I")):
        e = rt + 16 + 32 * i
        out[bytes(d[e : e + 16])] = (e - rt, get(d, e + 16, "<Q"), get(d, e + 24, "<I"))
    return out


def vhdx_meta_item(d, item):
    """(offset of the table entry, absolute offset of the item's value)."""
    _, moff, _ = vhdx_regions(d)[META_GUID]
    for i in range(get(d, moff + 10, "<H")):
        e = moff + 32 + 32 * i
        if bytes(d[e : e + 16]) == item:
            return e, moff + get(d, e + 16, "<I")
    raise KeyError(item)


x = base("vhdx", "x.vhdx", "8M", "block_size=1M,log_size=1M")
regions = vhdx_regions(x)
bat_entry, bat_off, bat_len = regions[BAT_GUID]
meta_entry, meta_off, _ = regions[META_GUID]
case("vhdx-file-identifier", "vhdx", put(x, 0, "8s", b"notvhdx!"), "no 'vhdxfile' file type identifier")
both_bad = bytearray(x)
both_bad[(64 << 10) + 100] ^= 1
both_bad[(128 << 10) + 100] ^= 1
case("vhdx-header-checksums", "vhdx", both_bad, "header")
case("vhdx-header-version", "vhdx", vhdx_header(x, 66, "<H", 2), "version")
case("vhdx-log-length-unaligned", "vhdx", vhdx_header(x, 68, "<I", 4096), "is not 1 MiB aligned")
case("vhdx-log-offset-past-eof", "vhdx", vhdx_header(x, 72, "<Q", 1 << 40), "log")
case("vhdx-region-signature", "vhdx", vhdx_region(x, 0, "4s", b"nope"), "region table")
case("vhdx-region-count-huge", "vhdx", vhdx_region(x, 8, "<I", 5000), "region")
case("vhdx-region-bat-past-eof", "vhdx", vhdx_region(x, bat_entry + 16, "<Q", 1 << 40), "BAT region")
case("vhdx-region-bat-unaligned", "vhdx", vhdx_region(x, bat_entry + 16, "<Q", bat_off + 4096), "BAT region")
case("vhdx-region-unknown-required", "vhdx", vhdx_region(x, bat_entry, "16s", b"\x42" * 16), "region")
case("vhdx-region-bat-overlaps-metadata", "vhdx", vhdx_region(x, bat_entry + 16, "<Q", meta_off), "overlap")
case("vhdx-metadata-signature", "vhdx", put(x, meta_off, "8s", b"notmetad"), "metadata")
fp_entry, fp_val = vhdx_meta_item(x, FILE_PARAMS)
case("vhdx-block-size-not-power-of-two", "vhdx", put(x, fp_val, "<I", 3 << 20), "block size")
case("vhdx-has-parent-without-locator", "vhdx", put(x, fp_val + 4, "<I", 2), "parent")
ds_entry, ds_val = vhdx_meta_item(x, DISK_SIZE)
case("vhdx-virtual-size-odd", "vhdx", put(x, ds_val, "<Q", (8 << 20) + 1), "is not a multiple of the 512-byte sector")
case("vhdx-bat-2-40-entries", "vhdx", put(x, ds_val, "<Q", (1 << 40) * (1 << 20)), "virtual size")
case("vhdx-bat-larger-than-region", "vhdx", put(x, ds_val, "<Q", 60 << 40), "the BAT needs")
ls_entry, ls_val = vhdx_meta_item(x, LOGICAL_SECTOR)
case("vhdx-logical-sector-1024", "vhdx", put(x, ls_val, "<I", 1024), "sector size")
case("vhdx-metadata-unknown-required", "vhdx", put(x, ds_entry, "16s", b"\x42" * 16), "metadata")
case("vhdx-bat-reserved-state", "vhdx", put(x, bat_off, "<Q", 4), "reserved BAT state 4")
case("vhdx-bat-block-past-eof", "vhdx", put(x, bat_off, "<Q", (1 << 30 << 20) | 6), "is outside the file")
case("vhdx-bat-shared-payload-block", "vhdx", put(x, bat_off + 8, "<Q", get(x, bat_off, "<Q")), "both point at file offset")

# ---------------------------------------------------------------------------------------------------- vmdk
# Hosted sparse extent header (VMDK 5.0 "Header"), little-endian: magic 0, version 4, flags 8, capacity 12,
# grainSize 20, descriptorOffset 28, descriptorSize 36, numGTEsPerGT 44, rgdOffset 48, gdOffset 56, overHead 64,
# uncleanShutdown 72, newline bytes 73..77, compressAlgorithm 77.
k = base("vmdk", "k.vmdk", "4M", "subformat=monolithicSparse")
gd_off = get(k, 56, "<Q") * 512
gt_off = get(k, gd_off, "<I") * 512
case("vmdk-magic-cowd", "vmdk", put(k, 0, "4s", b"COWD"), "vmfsSparse")
case("vmdk-version-4", "vmdk", put(k, 4, "<I", 4), "sparse extent version 4")
case("vmdk-flags-unknown-incompat", "vmdk", put(k, 8, "<I", get(k, 8, "<I") | (1 << 20)), "unknown incompatible header flags")
case("vmdk-newline-bytes", "vmdk", put(k, 73, "4s", b"\n \n\n"), "newline-detection bytes are wrong")
case("vmdk-compress-algorithm-2", "vmdk", put(k, 77, "<H", 2), "compression algorithm 2")
case("vmdk-capacity-huge", "vmdk", put(k, 12, "<Q", 1 << 50), "larger than 64 TiB")
case("vmdk-grain-size-3", "vmdk", put(k, 20, "<Q", 3), "grain size of 3 sectors")
case("vmdk-gtes-0", "vmdk", put(k, 44, "<I", 0), "0 grain table entries per table")
case("vmdk-gtes-4096", "vmdk", put(k, 44, "<I", 4096), "4096 grain table entries per table")
case("vmdk-gd-past-eof", "vmdk", put(k, 56, "<Q", 1 << 30), "grain directory")
# capacity 2^37 sectors (64 TiB) with 8-sector grains and 1 GTE per table: 2^34 grain tables claimed.
kg = put(k, 12, "<Q", 1 << 37)
kg = put(kg, 20, "<Q", 8)
case("vmdk-gd-10-9-tables", "vmdk", put(kg, 44, "<I", 1), "grain directory of")
case("vmdk-gd-entry-past-eof", "vmdk", put(k, gd_off, "<I", 0x7FFFFFFF), "grain directory entry 0 points past the end")
# 64 MiB with 512 GTEs of 64 KiB grains per table: two grain tables, both preallocated by qemu.
k64 = base("vmdk", "k64.vmdk", "64M", "subformat=monolithicSparse")
gd64 = get(k64, 56, "<Q") * 512
case("vmdk-gd-shared-table", "vmdk", put(k64, gd64 + 4, "<I", get(k64, gd64, "<I")), "share the grain table")
case("vmdk-gte-past-eof", "vmdk", put(k, gt_off, "<I", 0x7FFFFFFF), "points past the end of the file")
case("vmdk-overhead-past-eof", "vmdk", put(k, 64, "<Q", 1 << 40), "file truncated")
case("vmdk-descriptor-huge", "vmdk", put(k, 36, "<Q", 1 << 20), "embedded descriptor of")
# Descriptor files (text).
kf_path = os.path.join(WORK, "kf.vmdk")
run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", kf_path, "1M")
kf = open(kf_path, "rb").read().decode()
with open(os.path.join(WORK, "kf-flat.vmdk"), "rb") as src, open(os.path.join(OUT, "kf-flat.vmdk"), "wb") as dst:
    dst.write(src.read())
case("vmdk-desc-extent-absolute", "vmdk", kf.replace('"kf-flat.vmdk"', '"/etc/passwd"').encode(), "outside the image's folder")
case("vmdk-desc-extent-dotdot", "vmdk", kf.replace('"kf-flat.vmdk"', '"../kf-flat.vmdk"').encode(), "outside the image's folder")
case("vmdk-desc-extent-type", "vmdk", kf.replace(" FLAT ", " BOGUS ").encode(), "BOGUS")
case("vmdk-desc-create-type", "vmdk", kf.replace('createType="monolithicFlat"', 'createType="fancyNew"').encode(), "fancyNew")
case("vmdk-desc-extent-access", "vmdk", kf.replace("RW 2048", "NOACCESS 2048").encode(), "NOACCESS")
case("vmdk-desc-extent-missing", "vmdk", kf.replace('"kf-flat.vmdk"', '"nothere-flat.vmdk"').encode(), "nothere-flat.vmdk")
# Extents must be the image's own disk files (*.vmdk or <stem>-flat<ext>.. beside it, CVE-2022-47951): a
# descriptor naming a file of its folder that is neither is refused.
with open(os.path.join(OUT, "secret.txt"), "wb") as f:
    f.write(b"\x5e" * (1 << 20))
case("vmdk-desc-extent-not-own", "vmdk", kf.replace('"kf-flat.vmdk"', '"secret.txt"').encode(), "own extent files, those named *.vmdk or like")
# One extent file named by two extent lines.
with open(os.path.join(WORK, "kf-flat.vmdk"), "rb") as src, open(os.path.join(OUT, "vmdk-desc-extent-twice-flat.vmdk"), "wb") as dst:
    dst.write(src.read())
kf_line = next(l for l in kf.splitlines() if l.startswith("RW "))
kf_twice = kf.replace(kf_line, kf_line + "\n" + kf_line).replace('"kf-flat.vmdk"', '"vmdk-desc-extent-twice-flat.vmdk"')
case("vmdk-desc-extent-twice", "vmdk", kf_twice.encode(), "named by two extent lines")
case("vmdk-desc-binary", "vmdk", b"\x00\x01\x02garbage" * 10, "descriptor")
# streamOptimized: a grain marker that names the wrong LBA.
run("qemu-img", "convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized", os.path.join(WORK, "k.vmdk"), os.path.join(WORK, "ks.vmdk"))
ks = bytearray(open(os.path.join(WORK, "ks.vmdk"), "rb").read())
first_marker = get(ks, 64, "<Q") * 512  # overHead: grains start after the header and descriptor
case("vmdk-stream-marker-lba", "vmdk", put(ks, first_marker, "<Q", 12345 * 8), "grain marker at", "convert")
case("vmdk-stream-grain-garbage", "vmdk", put(ks, first_marker + 12, "<Q", 0xFFFFFFFFFFFFFFFF), "does not inflate", "convert")

# ----------------------------------------------------------------------------------------------------- vdi
# Header (VDICore.h VDIPREHEADER + VDIHEADER1), little-endian: signature 64, version 68, header_size 72,
# image_type 76, flags 80, offset_bmap 340, offset_data 344, sector_size 360, disk_size 368, block_size 376,
# block_extra 380, blocks_in_image 384, blocks_allocated 388, uuid_link 424, uuid_parent 440.
v = base("vdi", "v.vdi", "4M")
bmap = get(v, 340, "<I")
case("vdi-signature", "vdi", put(v, 64, "<I", 0x12345678), "signature 0x12345678 is not 0xbeda107f")
case("vdi-version", "vdi", put(v, 68, "<I", 0x00020000), "version 2.0")
case("vdi-header-size", "vdi", put(v, 72, "<I", 0x100), "header size 0x100")
case("vdi-type-undo", "vdi", put(v, 76, "<I", 3), "undo images")
case("vdi-type-diff", "vdi", put(v, 76, "<I", 4), "differencing images")
case("vdi-type-unknown", "vdi", put(v, 76, "<I", 9), "image type 9")
case("vdi-parent-uuid", "vdi", put(v, 440, "16s", b"\x11" * 16), "has a parent")
case("vdi-sector-size", "vdi", put(v, 360, "<I", 4096), "sector size 4096 is not 512")
case("vdi-block-extra", "vdi", put(v, 380, "<I", 512), "512 extra bytes per block")
case("vdi-block-size", "vdi", put(v, 376, "<I", 3000), "block size 3000")
case("vdi-blocks-huge", "vdi", put(v, 384, "<I", 0xFFFFFFFF), "blocks (at most")
case("vdi-allocated-above-blocks", "vdi", put(v, 388, "<I", 1000), "blocks allocated out of")
case("vdi-disk-size-above-blocks", "vdi", put(v, 368, "<Q", 1 << 40), "is more than 4 blocks")
case("vdi-bmap-past-eof", "vdi", put(v, 340, "<I", 1 << 30), "is outside the file")
case("vdi-data-inside-bmap", "vdi", put(v, 344, "<I", bmap), "is inside the block map")
case("vdi-bmap-entry-above-allocated", "vdi", put(v, bmap, "<I", 1000), "not below blocks_allocated")
case("vdi-data-offset-past-eof", "vdi", put(v, 344, "<I", 0x7FFFFE00), "past the end of the file")

# ----------------------------------------------------------------------------------------------------- ova
# DSP0243 5.3: a ustar archive, descriptor first. The disk is the streamOptimized VMDK above.
DISK = bytes(open(os.path.join(WORK, "ks.vmdk"), "rb").read())
CAPACITY = 4 << 20


def ovf(href="disk1.vmdk", size=None, capacity=CAPACITY, file_extra="", prolog=""):
    size = len(DISK) if size is None else size
    return f"""<?xml version="1.0" encoding="UTF-8"?>{prolog}
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:id="file1" ovf:href="{href}" ovf:size="{size}"{file_extra}/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{capacity}"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A VM</Info>
    <VirtualHardwareSection>
      <Info>Hardware</Info>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>disk0</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
""".encode()


def tar(members, format=tarfile.USTAR_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            t.addfile(info, io.BytesIO(data))
    return bytearray(buf.getvalue())


good_ova = tar([("vm.ovf", ovf()), ("disk1.vmdk", DISK)])
case("ova-descriptor-not-first", "ova", tar([("disk1.vmdk", DISK), ("vm.ovf", ovf())]), ".ovf")
case("ova-href-dotdot", "ova", tar([("vm.ovf", ovf(href="../disk1.vmdk")), ("disk1.vmdk", DISK)]), "../disk1.vmdk")
case("ova-href-absolute", "ova", tar([("vm.ovf", ovf(href="/etc/passwd")), ("disk1.vmdk", DISK)]), "/etc/passwd")
case("ova-href-url", "ova", tar([("vm.ovf", ovf(href="http://example.com/d.vmdk")), ("disk1.vmdk", DISK)]), "http://example.com/d.vmdk")
case("ova-member-missing", "ova", tar([("vm.ovf", ovf(href="other.vmdk")), ("disk1.vmdk", DISK)]), "other.vmdk")
case("ova-size-mismatch", "ova", tar([("vm.ovf", ovf(size=12)), ("disk1.vmdk", DISK)]), "ovf:size")
case("ova-capacity-mismatch", "ova", tar([("vm.ovf", ovf(capacity=CAPACITY * 2)), ("disk1.vmdk", DISK)]), "capacity")
case("ova-compression-gzip", "ova", tar([("vm.ovf", ovf(file_extra=' ovf:compression="gzip"')), ("disk1.vmdk", DISK)]), "compression")
case("ova-chunk-size", "ova", tar([("vm.ovf", ovf(file_extra=' ovf:chunkSize="1048576"')), ("disk1.vmdk", DISK)]), "chunkSize")
case("ova-dtd", "ova", tar([("vm.ovf", ovf(prolog='\n<!DOCTYPE Envelope [<!ENTITY a "aaaa">]>')), ("disk1.vmdk", DISK)]), "descriptor")
bad_tar = bytearray(good_ova)
bad_tar[148:156] = b"0000000\x00"  # the first member's header checksum
case("ova-tar-checksum", "ova", bad_tar, "tar")


def tar_size(data, off, size):
    """Sets the size field of the tar header at `off` (11 octal digits and a NUL) and recomputes its checksum."""
    assert size < 8 << 30
    d = put(data, off + 124, "12s", b"%011o\x00" % size)
    d[off + 148:off + 156] = b"        "
    return put(d, off + 148, "8s", b"%06o\x00 " % sum(d[off:off + 512]))


case("ova-descriptor-size-huge", "ova", tar_size(good_ova, 0, (8 << 30) - 1), "descriptor is 8589934591 bytes")
# An extension header (a GNU long name, a PAX record set) claiming 8 GiB - 1: refused before any of it is read.
LONG = "a-descriptor-name-longer-than-the-100-bytes-of-a-ustar-name-field-" + "x" * 40 + ".ovf"
gnu_ova = tar([(LONG, ovf()), ("disk1.vmdk", DISK)], tarfile.GNU_FORMAT)
assert gnu_ova[156:157] == b"L"
case("ova-gnu-long-name-huge", "ova", tar_size(gnu_ova, 0, (8 << 30) - 1), "GNU long name ('L') member at offset 0 is 8589934591 bytes")
pax_ova = tar([(LONG, ovf()), ("disk1.vmdk", DISK)], tarfile.PAX_FORMAT)
assert pax_ova[156:157] == b"x"
case("ova-pax-header-huge", "ova", tar_size(pax_ova, 0, (8 << 30) - 1), "PAX extended header ('x') member at offset 0 is 8589934591 bytes")

with open(os.path.join(OUT, "manifest.tsv"), "w") as f:
    for row in MANIFEST:
        f.write("\t".join(row) + "\n")
print(f"make-corpus: {len(MANIFEST)} cases in {OUT}")
