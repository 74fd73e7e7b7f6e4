#!/usr/bin/env bash
# Builds a tiny BOOTABLE test guest as a raw disk, with no loop devices, no mounts and no chroot:
#   - kernel: the Debian linux-image-6.1.0-NN-amd64 that tests/guests/kernel.pin names, unpacked with its modules
#     under $IMGSHIFT_GUEST_CACHE (default /var/tmp/imgshift-guest-cache) by tests/guests/fetch-kernel.sh, which
#     .ci/install-deps runs: this script downloads nothing and fails naming that command when the cache is empty;
#   - initramfs: busybox-static + the variant's storage/network modules (with their modules.dep closure) + /init;
#   - root: ext4 made by `mkfs.ext4 -d DIR -E offset=...` straight into the disk file at the partition offset;
#   - BIOS: MBR (or GPT + BIOS boot partition) + GRUB i386-pc (boot.img's 440 bytes, core.img in the MBR gap or
#     in the BIOS boot partition, its sector pointers patched); UEFI: GPT + FAT16 ESP (`mkfs.vfat --offset -F 16`)
#     with a `grub-mkstandalone -O x86_64-efi` \EFI\BOOT\BOOTX64.EFI copied in with mtools.
#
#   mkguest.sh VARIANT OUT.raw [SIZE_MIB]          (SIZE_MIB defaults to 64)
#
# /init loads the modules it has, waits up to 8 s for the root named by `root=` on the kernel command line
# (LABEL=imgshift-root, except the sda variant), mounts it read-only, prints on ttyS0 exactly one line
# `IMGSHIFT-BOOT-OK machine-id=<contents of /etc/machine-id>` and powers off. With no root device it prints
# `IMGSHIFT-NO-ROOT` and powers off, so a negative boot is fast. Boot it with tests/guests/boot.sh.
#
# Variants (the contract other tests rely on; add, do not change):
#   bios      MBR + GRUB (core.img at LBA 1); initramfs: microcode cpio + gzip; virtio_blk/scsi/pci/net, nvme, ena,
#             ahci, ata_piix, sd_mod, ext4; fstab by UUID and LABEL; cloud-init installed
#   uefi      GPT + 32 MiB ESP (\EFI\BOOT\BOOTX64.EFI) + root; initramfs: microcode cpio + zstd; as bios plus
#             hv_vmbus, hv_storvsc, hv_netvsc; fstab by UUID (root and /boot/efi); waagent and amazon-ssm-agent
#   novirtio  as bios, initramfs xz-compressed with ahci, ata_piix, sd_mod, ext4 only: boots only on sata/ide
#   sda       as bios, initramfs lz4 (legacy format); `/dev/sda1` in fstab and `root=/dev/sda1` in grub.cfg:
#             boots on sata/ide/scsi (sd names), not on virtio (vda) or nvme
#   noesp     GPT without ESP: BIOS boot partition holding GRUB's core.img + root; initramfs gzip only; BIOS only
#   bootpart  as bios, with a separate /boot: sda1 ext4 "imgshift-boot" (kernel, initramfs, grub/grub.cfg),
#             sda2 the root; fstab mounts /boot by UUID (boot fs uuid 5e1f0c2a-7b3d-4c8e-9f10-00000000b007)
#   bomb      as bios, but the initramfs is hostile: 1500 nested directories, then a member declaring 4 GiB in an
#             archive that ends 4 KiB later (the kernel cannot unpack it either: no marker)
#
# Every variant's root holds machine-specific state (the generalisation candidates): /etc/machine-id, ssh host
# keys, /var/log/* files, /root/.bash_history, DHCP leases, /var/lib/cloud/instance. Fixed identifiers:
# ext4 label imgshift-root, uuid 5e1f0c2a-7b3d-4c8e-9f10-2a3b4c5d6e7f, ESP serial ABCD-1234, hostname guest-VARIANT,
# machine-id = md5("imgshift-VARIANT").
set -euo pipefail

variant=${1:?usage: mkguest.sh VARIANT OUT.raw [SIZE_MIB]}
out=${2:?usage: mkguest.sh VARIANT OUT.raw [SIZE_MIB]}
size_mib=${3:-64}
case $variant in bios | uefi | novirtio | sda | noesp | bootpart | bomb) ;; *)
  echo "mkguest.sh: unknown variant $variant (bios uefi novirtio sda noesp bootpart bomb)" >&2
  exit 2
  ;;
esac
for c in dpkg-deb depmod cpio gzip zstd xz lz4 sfdisk mkfs.ext4 mkfs.vfat mmd mcopy grub-mkimage grub-mkstandalone; do
  command -v "$c" >/dev/null || {
    echo "mkguest.sh: $c is missing: run .ci/install-deps" >&2
    exit 1
  }
done
[ -x /bin/busybox ] || {
  echo "mkguest.sh: /bin/busybox is missing (busybox-static): run .ci/install-deps" >&2
  exit 1
}

label=imgshift-root
uuid=5e1f0c2a-7b3d-4c8e-9f10-2a3b4c5d6e7f
boot_label=imgshift-boot
boot_uuid=5e1f0c2a-7b3d-4c8e-9f10-00000000b007
cache=${IMGSHIFT_GUEST_CACHE:-/var/tmp/imgshift-guest-cache}
mkdir -p "$cache"

# --- kernel (fetched by .ci/install-deps) ------------------------------------------------------------------------
# The package tests/guests/fetch-kernel.sh put in the cache (it records its name in $cache/kernel.pkg), unless
# IMGSHIFT_KERNEL_PKG names a cached one. Nothing is downloaded here: tests never fetch from the network.
kernel_tree() {
  local pkg=${IMGSHIFT_KERNEL_PKG:-$(cat "$cache/kernel.pkg" 2>/dev/null || true)}
  if [ -z "$pkg" ] || [ ! -e "$cache/$pkg/.done" ]; then
    echo "mkguest.sh: no test guest kernel${pkg:+ ($pkg)} in $cache: fetch it with \`bash .ci/install-deps\`" \
      "(or \`bash tests/guests/fetch-kernel.sh\`)" >&2
    return 1
  fi
  echo "$cache/$pkg"
}
ktree=$(kernel_tree) || exit 1
kver=$(basename "$ktree")
kver=${kver#linux-image-}
kmods=$ktree/lib/modules/$kver
[ -f "$ktree/boot/vmlinuz-$kver" ] || {
  echo "mkguest.sh: no kernel in $ktree" >&2
  exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/mkguest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- initramfs ---------------------------------------------------------------------------------------------------
declare -A kpath kdeps seen
while IFS=: read -r k v; do
  n=${k##*/}
  n=${n%.ko}
  n=${n//-/_}
  kpath[$n]=$k
  kdeps[$n]=$v
done <"$kmods/modules.dep"
order=()
add_module() {
  local n=${1//-/_} d b
  [ -n "${seen[$n]:-}" ] && return 0
  [ -n "${kpath[$n]:-}" ] || {
    echo "mkguest.sh: module $n not in $kver" >&2
    exit 1
  }
  seen[$n]=1
  for d in ${kdeps[$n]}; do
    b=${d##*/}
    add_module "${b%.ko}"
  done
  order+=("${kpath[$n]}")
}

base_mods="crc32c_generic ext4 sd_mod ahci ata_piix"
case $variant in
  novirtio) mods=$base_mods ;;
  uefi) mods="$base_mods virtio_pci virtio_blk virtio_scsi virtio_net nvme ena hv_vmbus hv_storvsc hv_netvsc" ;;
  *) mods="$base_mods virtio_pci virtio_blk virtio_scsi virtio_net nvme ena" ;;
esac
for m in $mods; do add_module "$m"; done

ird=$work/initramfs
mkdir -p "$ird"/{bin,sbin,dev,proc,sys,mnt,etc,usr/bin,usr/sbin,lib/modules/"$kver"}
cp /bin/busybox "$ird/bin/busybox"
for m in "${order[@]}"; do
  mkdir -p "$ird/lib/modules/$kver/$(dirname "$m")"
  cp "$kmods/$m" "$ird/lib/modules/$kver/$m"
  echo "$kver/$m" >>"$ird/etc/modules.load"
done
cp "$kmods/modules.builtin" "$ird/lib/modules/$kver/modules.builtin"
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "$*" >/dev/ttyS0; }
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done </etc/modules.load
root=LABEL=imgshift-root
for a in $(cat /proc/cmdline); do case $a in root=*) root=${a#root=} ;; esac; done
dev=
i=0
while [ $i -lt 80 ]; do
  case $root in
    LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) || dev= ;;
    /dev/*) [ -b "$root" ] && dev=$root ;;
  esac
  [ -n "$dev" ] && break
  sleep 0.1
  i=$((i + 1))
done
if [ -n "$dev" ] && mount -t ext4 -o ro "$dev" /mnt; then
  say "IMGSHIFT-BOOT-OK machine-id=$(cat /mnt/etc/machine-id)"
else
  say IMGSHIFT-NO-ROOT
fi
sync
poweroff -f
INIT
chmod 755 "$ird/init"

# Early-microcode archive: an uncompressed cpio that real initramfs-tools/dracut images start with.
mc=$work/microcode
mkdir -p "$mc/kernel/x86/microcode"
printf 'imgshift test microcode placeholder\n' >"$mc/kernel/x86/microcode/GenuineIntel.bin"
cpio_of() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0); }

initrd=$work/initrd.img
case $variant in
  bios | bootpart) { cpio_of "$mc"; cpio_of "$ird" | gzip -9n; } >"$initrd" ;;
  uefi) { cpio_of "$mc"; cpio_of "$ird" | zstd -q -19; } >"$initrd" ;;
  novirtio) cpio_of "$ird" | xz -q --check=crc32 --lzma2=dict=1MiB >"$initrd" ;;
  sda) cpio_of "$ird" | lz4 -q -l -9 >"$initrd" ;;
  noesp) cpio_of "$ird" | gzip -9n >"$initrd" ;;
  bomb)
    # newc header: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
    # namesize, check. `member NAME MODE SIZE` prints a header + name + padding.
    member() {
      local name=$1 mode=$2 size=$3 ns=$((${#1} + 1))
      printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        1 "$mode" 0 0 1 0 "$size" 0 0 0 0 "$ns" 0
      printf '%s\0' "$name"
      printf "${pads[(4 - (110 + ns) % 4) % 4]}" # builtins only: 1500 members stay fast
    }
    pads=("" '\0' '\0\0' '\0\0\0')
    {
      cpio_of "$mc"
      {
        p=d
        for _ in $(seq 1500); do
          member "$p" $((040755)) 0
          p=$p/d
        done
        member "huge.bin" $((0100644)) $((0xFFFFFFFF))
        head -c 4096 /dev/zero
      } | gzip -9n
    } >"$initrd"
    ;;
esac

# --- root filesystem ---------------------------------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,boot/grub,etc/ssh,etc/cloud,usr/bin,usr/sbin,root,tmp,proc,sys,dev,mnt,var/log/apt} \
  "$root"/var/lib/{dhcp,cloud/instances/i-0imgshift"$variant"} "$root/lib/modules/$kver"
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$ktree/boot/vmlinuz-$kver" "$root/boot/vmlinuz-$kver"
cp "$ktree/boot/config-$kver" "$root/boot/config-$kver"
cp "$initrd" "$root/boot/initrd.img-$kver"
cp "$kmods/modules.builtin" "$kmods/modules.order" "$kmods/modules.dep" "$root/lib/modules/$kver/"
# Network drivers as installed modules on the root (udev loads them after the root is mounted); the storage
# drivers that matter for booting are the initramfs's.
case $variant in
  novirtio) net_mods= ;;
  uefi) net_mods="virtio_net ena hv_netvsc" ;;
  *) net_mods="virtio_net ena" ;;
esac
for m in $net_mods; do
  p=${kpath[$m]}
  mkdir -p "$root/lib/modules/$kver/$(dirname "$p")"
  cp "$kmods/$p" "$root/lib/modules/$kver/$p"
done
cat >"$root/etc/os-release" <<'OS'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
OS
echo "guest-$variant" >"$root/etc/hostname"
printf 'imgshift-%s' "$variant" | md5sum | cut -c1-32 >"$root/etc/machine-id"
for k in rsa ecdsa ed25519; do
  printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\nimgshift test %s host key (not a real key)\n-----END OPENSSH PRIVATE KEY-----\n' "$k" \
    >"$root/etc/ssh/ssh_host_${k}_key"
  chmod 600 "$root/etc/ssh/ssh_host_${k}_key"
  echo "ssh-$k AAAAimgshifttest root@guest-$variant" >"$root/etc/ssh/ssh_host_${k}_key.pub"
done
echo "Nov 22 10:00:00 guest-$variant kernel: booted" >"$root/var/log/syslog"
echo "Nov 22 10:00:01 guest-$variant sshd[1]: Server listening" >"$root/var/log/auth.log"
echo "Start-Date: 2026-11-22  10:00:00" >"$root/var/log/apt/history.log"
printf 'ls\nsudo reboot\n' >"$root/root/.bash_history"
chmod 600 "$root/root/.bash_history"
printf 'lease {\n  interface "eth0";\n  fixed-address 10.0.2.15;\n}\n' >"$root/var/lib/dhcp/dhclient.eth0.leases"
echo "i-0imgshift$variant" >"$root/var/lib/cloud/instances/i-0imgshift$variant/instance-id"
ln -s "/var/lib/cloud/instances/i-0imgshift$variant" "$root/var/lib/cloud/instance"

agent() { mkdir -p "$root/$(dirname "$1")" && printf '#!/bin/sh\n# imgshift test stand-in for %s\n' "$1" >"$root/$1" && chmod 755 "$root/$1"; }
case $variant in
  uefi)
    agent usr/sbin/waagent
    echo 'Provisioning.Agent=auto' >"$root/etc/waagent.conf"
    agent usr/bin/amazon-ssm-agent
    ;;
  *)
    agent usr/bin/cloud-init
    echo 'datasource_list: [ NoCloud, None ]' >"$root/etc/cloud/cloud.cfg"
    ;;
esac

root_arg="LABEL=$label"
case $variant in
  sda)
    root_arg=/dev/sda1
    printf '/dev/sda1 / ext4 errors=remount-ro 0 1\nproc /proc proc defaults 0 0\n' >"$root/etc/fstab"
    ;;
  bootpart)
    printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s / ext4 errors=remount-ro 0 1\nUUID=%s /boot ext4 defaults 0 2\n' "$uuid" "$boot_uuid" >"$root/etc/fstab"
    ;;
  uefi)
    printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s / ext4 errors=remount-ro 0 1\nUUID=ABCD-1234 /boot/efi vfat umask=0077 0 1\n' "$uuid" >"$root/etc/fstab"
    mkdir -p "$root/boot/efi"
    ;;
  *)
    printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s / ext4 errors=remount-ro 0 1\nLABEL=%s /srv ext4 ro,nofail 0 2\n' "$uuid" "$label" >"$root/etc/fstab"
    ;;
esac
cat >"$root/boot/grub/grub.cfg" <<CFG
set timeout=0
set default=0
menuentry 'Debian GNU/Linux (imgshift test guest)' {
	linux /boot/vmlinuz-$kver root=$root_arg ro console=ttyS0 panic=1 quiet
	initrd /boot/initrd.img-$kver
}
CFG

# A separate /boot: the kernel, initramfs and grub/ move to their own filesystem, paths relative to it.
if [ "$variant" = bootpart ]; then
  bootfs=$work/bootfs
  mkdir -p "$bootfs"
  mv "$root"/boot/* "$bootfs"/
  sed -i 's| /boot/| /|' "$bootfs/grub/grub.cfg"
fi

# --- disk ----------------------------------------------------------------------------------------------------------
mib=1048576
size_b=$((size_mib * mib))
rm -f "$out"
truncate -s "$size_b" "$out"
# The search GRUB runs before reading /boot/grub/grub.cfg from the root.
if [ "$variant" = bootpart ]; then
  printf 'search --no-floppy --label %s --set root\nset prefix=($root)/grub\nconfigfile ($root)/grub/grub.cfg\n' "$boot_label" >"$work/early.cfg"
else
  printf 'search --no-floppy --label %s --set root\nset prefix=($root)/boot/grub\nconfigfile ($root)/boot/grub/grub.cfg\n' "$label" >"$work/early.cfg"
fi
grub_mods="normal configfile search search_label part_msdos part_gpt ext2 linux echo test"

bios_boot() { # $1 = LBA of core.img
  local lba=$1
  grub-mkimage -O i386-pc -o "$work/core.img" -c "$work/early.cfg" -p /boot/grub biosdisk $grub_mods
  # boot.img's boot code (first 440 bytes; the partition table stays), then core.img at $lba.
  dd if=/usr/lib/grub/i386-pc/boot.img of="$out" bs=440 count=1 conv=notrunc status=none
  dd if="$work/core.img" of="$out" bs=512 seek="$lba" conv=notrunc status=none
  if [ "$lba" != 1 ]; then
    # boot.img's kernel_sector (offset 0x5c, u64 LE) and diskboot.img's first blocklist start (offset 0x1f4 of
    # core.img's first sector, u64 LE) default to LBA 1 and 2; grub-install patches them the same way.
    le64() { printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x\\x%02x\\x%02x\\x%02x\\x%02x' \
      $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)) 0 0 0 0)"; }
    le64 "$lba" | dd of="$out" bs=1 seek=$((0x5c)) conv=notrunc status=none
    le64 $((lba + 1)) | dd of="$out" bs=1 seek=$((lba * 512 + 0x1f4)) conv=notrunc status=none
  fi
}

case $variant in
  uefi)
    printf 'label: gpt\nlabel-id: 5E1F0C2A-0000-4000-8000-00000000AEF1\nstart=2048, size=65536, type=U, name="EFI System"\nstart=67584, size=%d, type=L, name=root\n' \
      $(((size_b - 67584 * 512 - mib) / 512)) | sfdisk -q "$out"
    # mkfs.vfat warns that the image is larger than the ESP ("block count mismatch"): that is the point here.
    mkfs.vfat -F 16 -i ABCD1234 -n ESP --offset 2048 "$out" 32768 >"$work/mkfs.vfat.log" 2>&1 || {
      cat "$work/mkfs.vfat.log" >&2
      exit 1
    }
    grub-mkstandalone -O x86_64-efi -o "$work/BOOTX64.EFI" --modules="$grub_mods" \
      --install-modules="$grub_mods fat" --locales= --themes= --fonts= \
      "boot/grub/grub.cfg=$work/early.cfg"
    mmd -i "$out@@1M" ::/EFI ::/EFI/BOOT
    mcopy -i "$out@@1M" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
    off=$((67584 * 512))
    ;;
  bootpart)
    printf 'label: dos\nlabel-id: 0x5e1f0c2a\nstart=2048, size=49152, type=83, bootable\nstart=51200, size=%d, type=83\n' \
      $(((size_b - 51200 * 512 - mib) / 512)) | sfdisk -q "$out"
    bios_boot 1
    mkfs.ext4 -q -F -L "$boot_label" -U "$boot_uuid" -E offset=$mib,root_owner=0:0 -d "$bootfs" "$out" 24576k
    off=$((51200 * 512))
    ;;
  noesp)
    printf 'label: gpt\nlabel-id: 5E1F0C2A-0000-4000-8000-0000000000E5\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name="BIOS boot"\nstart=4096, size=%d, type=L, name=root\n' \
      $(((size_b - 4096 * 512 - mib) / 512)) | sfdisk -q "$out"
    bios_boot 2048
    off=$((4096 * 512))
    ;;
  *)
    printf 'label: dos\nlabel-id: 0x5e1f0c2a\nstart=2048, size=%d, type=83, bootable\n' $(((size_b - 2 * mib) / 512)) | sfdisk -q "$out"
    bios_boot 1
    off=$mib
    ;;
esac
# Leave the last MiB free (GPT backup table) and make the ext4 exactly fill the partition up to there.
fs_k=$(((size_b - off - mib) / 1024))
mkfs.ext4 -q -F -L "$label" -U "$uuid" -E offset="$off",root_owner=0:0 -d "$root" "$out" "${fs_k}k"
