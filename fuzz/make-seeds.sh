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

# Guest parsers. Disks and filesystems are mostly zeros: the partitions, ext4, fat and ntfs targets read the
# sparse encoding (fuzz/src/guest_input.rs), built by sparse-seed.py with a large KEEP so whole metadata runs
# (inode tables' used part, MFT records, directories, hives) survive.
guest_tools_ok=1
for t in sfdisk mke2fs mkfs.vfat mmd mcopy cpio gzip; do
    command -v "$t" >/dev/null || { echo "make-seeds: $t not found: guest seeds skipped (.ci/install-deps)" >&2; guest_tools_ok=0; }
done
pe() { # a minimal x86_64 PE header: MZ, e_lfanew = 0x80, "PE\0\0", machine AMD64
    { printf 'MZ'; head -c 58 /dev/zero; printf '\x80\x00\x00\x00'; head -c 64 /dev/zero
      printf 'PE\0\0\x64\x86'; head -c 378 /dev/zero; } >"$1"
}
sparse() { python3 "$here/sparse-seed.py" "$1" "$2" "${3:-1048576}"; }
if [ "$guest_tools_ok" = 1 ]; then
    # initramfs: newc cpio archives with module members and a modules.builtin, plain and compressed, and the
    # early-microcode layout (a plain archive, then a compressed one).
    r="$work/initrd-root"
    mkdir -p "$r/usr/lib/modules/6.1.0-1-amd64/kernel/drivers/block" "$r/kernel/x86/microcode"
    for m in virtio_blk.ko nvme.ko.xz ena.ko.zst hv_storvsc.ko.gz; do echo "$m" >"$r/usr/lib/modules/6.1.0-1-amd64/kernel/drivers/block/$m"; done
    printf 'kernel/drivers/ata/ahci.ko\nkernel/drivers/scsi/sd_mod.ko\n' >"$r/usr/lib/modules/6.1.0-1-amd64/modules.builtin"
    echo microcode >"$r/kernel/x86/microcode/GenuineIntel.bin"
    (cd "$r" && find usr | sort | cpio -o -H newc --quiet) >"$work/initrd.cpio"
    (cd "$r" && find kernel | sort | cpio -o -H newc --quiet) >"$work/early.cpio"
    mkdir -p "$out/initramfs"
    cp "$work/initrd.cpio" "$out/initramfs/plain.cpio"
    gzip -9c "$work/initrd.cpio" >"$out/initramfs/initrd.gz"
    cat "$work/early.cpio" "$out/initramfs/initrd.gz" >"$out/initramfs/early+gzip"
    command -v zstd >/dev/null && zstd -q -19 -c "$work/initrd.cpio" >"$out/initramfs/initrd.zst"
    command -v xz >/dev/null && xz -c --check=crc32 "$work/initrd.cpio" >"$out/initramfs/initrd.xz"
    command -v lz4 >/dev/null && lz4 -q -l -c "$work/initrd.cpio" >"$out/initramfs/initrd.lz4-legacy"
    command -v lz4 >/dev/null && lz4 -q -c "$work/initrd.cpio" >"$out/initramfs/initrd.lz4"

    # ext4 / ext2: a Linux root with what os.rs reads (os-release, fstab, hostname, machine-id, an ELF /bin/sh,
    # kernels and an initramfs in /boot, grub.cfg, modules), made by mke2fs -d.
    r="$work/linux-root"
    mkdir -p "$r/etc" "$r/bin" "$r/boot/grub" "$r/lib/modules/6.1.0-1-amd64/kernel/drivers/block" "$r/etc/cloud"
    printf 'ID=debian\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_ID="12"\n' >"$r/etc/os-release"
    printf 'UUID=0b8c7c1e-1111-4c1a-9a55-000000000001 / ext4 defaults 0 1\n/dev/vda15 /boot/efi vfat defaults 0 2\n' >"$r/etc/fstab"
    echo seedhost >"$r/etc/hostname"
    echo 0123456789abcdef0123456789abcdef >"$r/etc/machine-id"
    { printf '\x7fELF\x02\x01\x01'; head -c 11 /dev/zero; printf '\x3e\x00'; head -c 44 /dev/zero; } >"$r/bin/sh"
    echo kernel >"$r/boot/vmlinuz-6.1.0-1-amd64"
    echo kernel >"$r/boot/vmlinuz-5.10.0-9-amd64"
    cp "$out/initramfs/initrd.gz" "$r/boot/initrd.img-6.1.0-1-amd64"
    printf 'menuentry "Debian" {\n\tlinux /boot/vmlinuz-6.1.0-1-amd64 root=/dev/vda1 ro quiet\n\tinitrd /boot/initrd.img-6.1.0-1-amd64\n}\n' >"$r/boot/grub/grub.cfg"
    echo virtio_blk >"$r/lib/modules/6.1.0-1-amd64/kernel/drivers/block/virtio_blk.ko"
    printf 'kernel/drivers/ata/ahci.ko\n' >"$r/lib/modules/6.1.0-1-amd64/modules.builtin"
    printf 'kernel/drivers/block/virtio_blk.ko:\n' >"$r/lib/modules/6.1.0-1-amd64/modules.dep"
    mkdir -p "$out/ext4"
    for t in ext4 ext2; do
        truncate -s 8M "$work/$t.img"
        mke2fs -q -F -t "$t" -b 1024 -N 64 -L seed -U 0b8c7c1e-1111-4c1a-9a55-000000000001 -d "$r" "$work/$t.img"
        sparse "$work/$t.img" "$out/ext4/$t.sparse"
    done

    # fat: EFI system partitions (FAT12, FAT16, FAT32) with \EFI\BOOT\BOOTX64.EFI, a vendor loader and
    # \EFI\Microsoft\Boot\BCD.
    pe "$work/loader.efi"
    echo bcd >"$work/BCD"
    mkdir -p "$out/fat"
    for spec in 12:4 16:32 32:40; do
        bits=${spec%%:*}; mib=${spec##*:}
        img="$work/esp$bits.img"
        truncate -s "${mib}M" "$img"
        mkfs.vfat -F "$bits" -n ESP "$img" >/dev/null 2>&1
        MTOOLS_SKIP_CHECK=1 mmd -i "$img" ::/EFI ::/EFI/BOOT ::/EFI/debian ::/EFI/Microsoft ::/EFI/Microsoft/Boot
        MTOOLS_SKIP_CHECK=1 mcopy -i "$img" "$work/loader.efi" ::/EFI/BOOT/BOOTX64.EFI
        MTOOLS_SKIP_CHECK=1 mcopy -i "$img" "$work/loader.efi" ::/EFI/debian/shimx64.efi
        MTOOLS_SKIP_CHECK=1 mcopy -i "$img" "$work/BCD" ::/EFI/Microsoft/Boot/BCD
        sparse "$img" "$out/fat/esp$bits.sparse"
    done

    # partitions: an MBR with primaries and an extended chain of logical partitions (one FAT partition for the
    # probe), a GPT with an ESP, and a GPT with a hybrid-looking MBR.
    mkdir -p "$out/partitions"
    truncate -s 64M "$work/mbr.img"
    printf 'label: dos\n1M,8M,83,*\n,4M,7\n,,5\n,4M,83\n,4M,82\n,4M,b\n' | sfdisk -q "$work/mbr.img" >/dev/null
    dd if="$work/esp12.img" of="$work/mbr.img" bs=1M seek=1 conv=notrunc status=none
    sparse "$work/mbr.img" "$out/partitions/mbr-extended.sparse" 4096
    truncate -s 64M "$work/gpt.img"
    printf 'label: gpt\n1M,32M,U\n,8M,L\n,,EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n' | sfdisk -q "$work/gpt.img" >/dev/null
    dd if="$work/esp16.img" of="$work/gpt.img" bs=1M seek=1 conv=notrunc status=none
    sparse "$work/gpt.img" "$out/partitions/gpt-esp.sparse" 4096
    truncate -s 16M "$work/bare.img"
    printf 'label: dos\n2048,,ee\n' | sfdisk -q "$work/bare.img" >/dev/null
    sparse "$work/bare.img" "$out/partitions/protective-only.sparse" 4096
fi

# ntfs: the NTFS volumes of the Windows test disks (tests/guests/mkwindows.sh: Windows with hives, drivers,
# \bootmgr; a System Reserved volume). Building them boots the libguestfs appliance (a minute or two), so a
# folder of already built disks can be given instead: WINDOWS_DISKS=DIR (what tests/windows.rs caches under
# CARGO_TARGET_TMPDIR/windows-guests/<tag>/). Their partition tables are seeds of the partitions target too.
win="${WINDOWS_DISKS:-}"
if [ -z "$win" ] && command -v guestfish >/dev/null && command -v mkntfs >/dev/null && command -v hivexregedit >/dev/null; then
    win="$work/windows"
    bash "$here/../tests/guests/mkwindows.sh" "$win" >/dev/null || win=""
fi
# mkntfs fills $LogFile (2 MiB here) with 0xFF; nothing inspection reads is there, so its pages become zeros
# and drop out of the seed (the $MFT, $UpCase, indexes and hives stay whole: about 240 KiB a volume).
ff_pages() {
    python3 - "$1" <<'PY'
import sys
p = sys.argv[1]
d = bytearray(open(p, "rb").read())
ff, z = b"\xff" * 4096, bytes(4096)
for i in range(0, len(d) - 4095, 4096):
    if d[i:i + 4096] == ff:
        d[i:i + 4096] = z
open(p, "wb").write(d)
PY
}
if [ -n "$win" ] && [ -f "$win/sysreserved.raw" ]; then
    mkdir -p "$out/ntfs" "$out/partitions"
    for v in server2019 sysprep controlset2 win11; do
        # The Windows volume: sda2 on every variant (after an ESP on GPT or a System Reserved partition).
        start=$(sfdisk -J "$win/$v.raw" | python3 -c 'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"]; print(p[-1]["start"], p[-1]["size"])')
        set -- $start
        dd if="$win/$v.raw" of="$work/$v.ntfs" bs=512 skip="$1" count="$2" status=none
        ff_pages "$work/$v.ntfs"
        sparse "$work/$v.ntfs" "$out/ntfs/$v.sparse"
        sparse "$win/$v.raw" "$out/partitions/windows-$v.sparse" 4096
    done
    start=$(sfdisk -J "$win/sysreserved.raw" | python3 -c 'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"]; print(p[0]["start"], p[0]["size"])')
    set -- $start
    dd if="$win/sysreserved.raw" of="$work/sysreserved.ntfs" bs=512 skip="$1" count="$2" status=none
    ff_pages "$work/sysreserved.ntfs"
    sparse "$work/sysreserved.ntfs" "$out/ntfs/system-reserved.sparse"
else
    echo "make-seeds: no Windows test disks (WINDOWS_DISKS unset, or guestfish/mkntfs/hivexregedit missing): no ntfs seeds" >&2
fi

du -sh "$out"/* | sed 's/^/make-seeds: /'
