#!/usr/bin/env bash
# Builds the seed corpora (fuzz/corpus/<target>/) from small images made by qemu-img / qemu-io, so the fuzzers
# start from valid structures instead of random bytes. The seeds are not committed (fuzz/corpus is ignored);
# this script regenerates them in a few seconds. Needs qemu-utils, tar and python3.
# Usage: fuzz/make-seeds.sh [OUT_DIR]   (default: fuzz/corpus)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/corpus}"
command -v qemu-img >/dev/null || { echo "make-seeds: qemu-img not found (apt-get install qemu-utils)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "make-seeds: python3 not found (it packs the VHDX seeds)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Writes a few patterns (data, explicit zeros, an unaligned tail) into an image.
fill() { # fmt file
    qemu-io -f "$1" -c 'write -P 0xab 0 64k' -c 'write -P 0x5a 300k 4k' -c 'write -z 512k 64k' \
        -c 'write -P 0x11 1000k 24k' "$2" >/dev/null
}
mk() { # fmt name size [create options...]
    local fmt="$1" name="$2" size="$3"; shift 3
    qemu-img create -q -f "$fmt" "$@" "$work/$name" "$size"
}
seed() { # target file [name]
    mkdir -p "$out/$1"
    cp "$2" "$out/$1/${3:-$(basename "$2")}"
}

# qcow2: small clusters keep the seeds small; v2, v3, compressed (zlib, zstd), extended L2, a backing reference.
mk qcow2 q-v3-512.qcow2 1M -o cluster_size=512; fill qcow2 "$work/q-v3-512.qcow2"
mk qcow2 q-v2.qcow2 1M -o compat=0.10,cluster_size=4096; fill qcow2 "$work/q-v2.qcow2"
mk qcow2 q-empty.qcow2 64M
mk qcow2 q-ext.qcow2 1M -o extended_l2=on,cluster_size=16k; fill qcow2 "$work/q-ext.qcow2"
qemu-io -f qcow2 -c 'write -P 0x77 20k 2k' "$work/q-ext.qcow2" >/dev/null
qemu-img convert -q -c -O qcow2 -o cluster_size=4096 "$work/q-v3-512.qcow2" "$work/q-zlib.qcow2"
qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=zstd "$work/q-v3-512.qcow2" "$work/q-zstd.qcow2"
mk qcow2 q-backed.qcow2 1M -o cluster_size=512 -b q-v2.qcow2 -F qcow2
qemu-img snapshot -c snap1 "$work/q-v2.qcow2"
# Persistent dirty bitmaps (bitmaps extension, directory, tables, data) with writes they recorded.
mk qcow2 q-bitmaps.qcow2 1M -o cluster_size=512
qemu-img bitmap --add -g 512 "$work/q-bitmaps.qcow2" b0
qemu-img bitmap --add --disable "$work/q-bitmaps.qcow2" b1
qemu-io -f qcow2 -c 'write -P 0x33 0 4k' -c 'write -P 0x44 600k 8k' "$work/q-bitmaps.qcow2" >/dev/null
for f in q-v3-512 q-v2 q-empty q-ext q-zlib q-zstd q-backed q-bitmaps; do seed qcow2 "$work/$f.qcow2"; done

# vpc: fixed, dynamic (empty and with data), a differencing disk (its parent is refused by the deny-all gate).
mk vpc v-fixed.vhd 256k -o subformat=fixed
qemu-io -f vpc -c 'write -P 0xab 0 16k' "$work/v-fixed.vhd" >/dev/null
mk vpc v-dyn-empty.vhd 64M -o subformat=dynamic
mk vpc v-dyn.vhd 1M -o subformat=dynamic; fill vpc "$work/v-dyn.vhd"
for f in v-fixed v-dyn-empty v-dyn; do seed vpc "$work/$f.vhd"; done

# vhdx: 1 MiB blocks and the smallest log; an empty one and one with data. qemu spaces the regions and blocks
# out to 8-9 MiB files; compact-vhdx.py packs them back to back (3 and 4 MiB, the smallest the format allows),
# so the fuzzer's -max_len can stay at 4 MiB and each execution copies less.
mk vhdx x-empty.vhdx 64M -o block_size=1M,log_size=1M
mk vhdx x-data.vhdx 2M -o block_size=1M,log_size=1M; fill vhdx "$work/x-data.vhdx"
# The vhdx target reads the sparse encoding (fuzz/src/lib.rs, run_sparse): sparse-seed.py keeps the non-zero
# runs, so a seed is a few KiB; both the compacted and qemu's own layout are seeds.
for f in x-empty x-data; do
    python3 "$here/compact-vhdx.py" "$work/$f.vhdx" "$work/$f-compact.vhdx"
    python3 "$here/sparse-seed.py" "$work/$f-compact.vhdx" "$work/$f-compact.sparse"
    python3 "$here/sparse-seed.py" "$work/$f.vhdx" "$work/$f.sparse"
    seed vhdx "$work/$f-compact.sparse"
    seed vhdx "$work/$f.sparse"
done

# vmdk: monolithicSparse (with data, and empty), streamOptimized, a monolithicFlat descriptor.
mk vmdk k-sparse.vmdk 1M -o subformat=monolithicSparse; fill vmdk "$work/k-sparse.vmdk"
mk vmdk k-empty.vmdk 64M
qemu-img convert -q -O vmdk -o subformat=streamOptimized "$work/k-sparse.vmdk" "$work/k-stream.vmdk"
mk vmdk k-flat.vmdk 64k -o subformat=monolithicFlat
for f in k-sparse k-empty k-stream k-flat; do seed vmdk "$work/$f.vmdk"; done
seed vmdk_descriptor "$work/k-flat.vmdk" k-flat.txt
# The descriptor embedded in a sparse extent (sector 1, up to the first NUL).
dd if="$work/k-sparse.vmdk" bs=512 skip=1 count=20 status=none | tr -d '\000' > "$work/k-embedded.txt"
seed vmdk_descriptor "$work/k-embedded.txt"
mk vmdk k-split.vmdk 64k -o subformat=twoGbMaxExtentSparse
seed vmdk_descriptor "$work/k-split.vmdk" k-split.txt

# vdi: static and dynamic.
mk vdi d-static.vdi 1M -o static=on; fill vdi "$work/d-static.vdi"
mk vdi d-dyn.vdi 2M; fill vdi "$work/d-dyn.vdi"
mk vdi d-empty.vdi 64M
for f in d-static d-dyn d-empty; do seed vdi "$work/$f.vdi"; done

# ova: an OVF descriptor first, then a streamOptimized disk, as ovftool packs it.
size=$(stat -c %s "$work/k-stream.vmdk")
cat > "$work/vm.ovf" <<OVF
<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:id="file1" ovf:href="disk1.vmdk" ovf:size="$size"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1048576"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A VM</Info>
    <VirtualHardwareSection>
      <Info>Hardware</Info>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>disk0</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
OVF
cp "$work/k-stream.vmdk" "$work/disk1.vmdk"
tar --format=ustar -C "$work" -cf "$work/vm.ova" vm.ovf disk1.vmdk
seed ova "$work/vm.ova"
seed vmdk_descriptor "$work/vm.ovf" not-a-descriptor.ovf

# hive: the minimal hive, and (with hivexregedit, Debian libwin-hivex-perl) SOFTWARE/SYSTEM-shaped hives with
# the keys Windows inspection reads, enough subkeys for lf lists, REG_SZ and REG_DWORD values.
seed hive "$here/../tests/data/windows/hive-minimal"
if command -v hivexregedit >/dev/null; then
    cp "$here/../tests/data/windows/hive-minimal" "$work/SYSTEM" && chmod u+w "$work/SYSTEM"
    {
        printf 'Windows Registry Editor Version 5.00\n\n[\\Select]\n"Current"=dword:00000001\n\n'
        printf '[\\ControlSet001]\n\n[\\ControlSet001\\Services]\n\n'
        for d in viostor vioscsi netkvm storvsc vmbus stornvme ena storahci AWSPVStorage; do
            printf '[\\ControlSet001\\Services\\%s]\n"Start"=dword:00000000\n"ImagePath"="System32\\\\drivers\\\\%s.sys"\n\n' "$d" "$d"
        done
    } >"$work/system.reg"
    hivexregedit --merge --prefix 'HKEY_LOCAL_MACHINE\SYSTEM' "$work/SYSTEM" "$work/system.reg"
    seed hive "$work/SYSTEM"
    cp "$here/../tests/data/windows/hive-minimal" "$work/SOFTWARE" && chmod u+w "$work/SOFTWARE"
    printf 'Windows Registry Editor Version 5.00\n\n[\\Microsoft]\n\n[\\Microsoft\\Windows NT]\n\n[\\Microsoft\\Windows NT\\CurrentVersion]\n"ProductName"="Windows Server 2019 Datacenter"\n"CurrentMajorVersionNumber"=dword:0000000a\n\n' >"$work/software.reg"
    hivexregedit --merge --prefix 'HKEY_LOCAL_MACHINE\SOFTWARE' "$work/SOFTWARE" "$work/software.reg"
    seed hive "$work/SOFTWARE"
else
    echo "make-seeds: hivexregedit not found (apt-get install libwin-hivex-perl): hive seeds are the minimal hive only" >&2
fi

du -sh "$out"/* | sed 's/^/make-seeds: /'
