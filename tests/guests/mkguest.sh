#!/usr/bin/env bash
# Builds a small test guest disk for `imgshift inspect`, with no loop devices, no mounts and no root-only steps:
# an ext4 root made by `mke2fs -d` straight into the disk file at the partition offset, a FAT ESP made by
# `mkfs.vfat --offset` + mtools, a fake kernel and a real newc initramfs (uncompressed early-microcode archive +
# gzip'd main archive) listing driver modules. Not bootable (the kernel is a stub): it exercises inspection.
#
#   mkguest.sh VARIANT OUT.raw [SIZE_MIB]
#
# Variants:
#   bios      MBR, boot code, ext4 root; virtio + nvme + ena modules, fstab by UUID/LABEL, cloud-init
#   uefi      GPT, ESP with \EFI\BOOT\BOOTX64.EFI, ext4 root; virtio + hv modules, waagent
#   novirtio  as bios, initramfs with ahci only (no virtio, nvme, ena)
#   sda       as bios, fstab names /dev/sda1
#   noesp     GPT with an ext4 root and no ESP, no boot code
#   bomb      as bios, initramfs member declaring a 4 GiB size in a tiny archive
set -euo pipefail
variant=$1 out=$2 size_mib=${3:-64}
kver=6.1.0-99-amd64
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{etc/ssh,bin,boot,usr/bin,usr/sbin,lib/modules/$kver/kernel/drivers}
cat > "$root/etc/os-release" <<OS
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
ID=debian
OS
echo "guest-$variant" > "$root/etc/hostname"
echo 0123456789abcdef0123456789abcdef > "$root/etc/machine-id"
for k in rsa ecdsa ed25519; do echo "fake $k key" > "$root/etc/ssh/ssh_host_${k}_key"; echo pub > "$root/etc/ssh/ssh_host_${k}_key.pub"; done
cp /bin/dash "$root/bin/sh"
head -c 65536 /dev/urandom > "$root/boot/vmlinuz-$kver"
head -c 1000 /dev/urandom > "$root/boot/vmlinuz-5.10.0-1-amd64"
printf 'kernel/drivers/block/loop.ko\nkernel/fs/ext4/ext4.ko\n' > "$root/lib/modules/$kver/modules.builtin"
case $variant in
  uefi) touch "$root/usr/sbin/waagent" ;;
  *) touch "$root/usr/bin/cloud-init" ;;
esac
case $variant in
  sda) printf '/dev/sda1 / ext4 defaults 0 1\nproc /proc proc defaults 0 0\n' > "$root/etc/fstab" ;;
  uefi) printf '# root\nUUID=11111111-2222-3333-4444-555555555555 / ext4 defaults 0 1\nUUID=ABCD-1234 /boot/efi vfat umask=0077 0 1\n' > "$root/etc/fstab" ;;
  *) printf '# root\nUUID=11111111-2222-3333-4444-555555555555 / ext4 defaults 0 1\nLABEL=guestroot /srv ext4 defaults 0 2\n' > "$root/etc/fstab" ;;
esac

# Initramfs: early-microcode archive (uncompressed) + gzip'd main archive.
ird=$work/ird mc=$work/mc
mkdir -p "$mc/kernel/x86/microcode" "$ird/lib/modules/$kver/kernel/drivers"
echo microcode > "$mc/kernel/x86/microcode/GenuineIntel.bin"
case $variant in
  novirtio) mods="ahci libahci sd_mod ext4" ;;
  uefi) mods="virtio_blk virtio_pci virtio_net hv_vmbus hv_storvsc hv_netvsc sd_mod ext4" ;;
  *) mods="virtio_blk virtio_scsi virtio_pci virtio_net nvme ena sd_mod ext4" ;;
esac
for m in $mods; do echo "module $m" > "$ird/lib/modules/$kver/kernel/drivers/$m.ko"; done
printf 'kernel/drivers/block/loop.ko\n' > "$ird/lib/modules/$kver/modules.builtin"
if [ "$variant" = bomb ]; then
  hdr() { printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' 1 $((0100644)) 0 0 1 0 "$1" 0 0 0 0 "$2" 0; }
  { hdr $((0xFFFFFFFF)) 6; printf 'huge\0\0'; head -c 4096 /dev/zero; } | gzip -9 > "$root/boot/initrd.img-$kver"
else
  (cd "$mc" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$root/boot/initrd.img-$kver"
  (cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -9 >> "$root/boot/initrd.img-$kver"
fi

size_b=$((size_mib * 1048576))
truncate -s "$size_b" "$out"
uuid=11111111-2222-3333-4444-555555555555
case $variant in
  uefi)
    printf 'label: gpt\nstart=2048, size=65536, type=U, name="EFI System"\nstart=67584, type=L, name=root\n' | sfdisk -q "$out"
    mkfs.vfat -F 16 -i ABCD1234 -n ESP --offset 2048 "$out" 32768 >/dev/null
    echo stub > "$work/BOOTX64.EFI"
    mmd -i "$out@@1M" ::/EFI ::/EFI/BOOT
    mcopy -i "$out@@1M" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
    off=$((67584 * 512)) ;;
  noesp)
    printf 'label: gpt\nstart=2048, type=L, name=root\n' | sfdisk -q "$out"
    off=1048576 ;;
  *)
    printf 'label: dos\nlabel-id: 0xfeed0001\nstart=2048, type=83, bootable\n' | sfdisk -q "$out"
    # Stand-in boot code in the first 440 bytes (inspection only checks that some is there).
    printf 'FAKE-GRUB-BOOT-CODE' | dd of="$out" conv=notrunc status=none
    off=1048576 ;;
esac
# GPT keeps 33 sectors at the end for the backup table.
fs_k=$(( (size_b - off - 1048576) / 1024 ))
mke2fs -q -t ext4 -L guestroot -U "$uuid" -d "$root" -E offset=$off "$out" "${fs_k}k"
