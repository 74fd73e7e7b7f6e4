#!/usr/bin/env bash
# Builds Windows-shaped test disks (raw) with no Windows installation, no loop devices and no host mounts:
#   - hives: copies of tests/data/windows/hive-minimal merged with `hivexregedit --merge` (libwin-hivex-perl);
#   - NTFS: `mkntfs` (ntfs-3g) on a partition-sized file, populated by ONE guestfish session for all variants
#     (libguestfs mounts it inside its appliance; ntfs-3g's own tools cannot create directories on an image);
#     then copied into the disk at the partition's offset;
#   - files: \Windows\System32\ntoskrnl.exe (a minimal x86_64 PE header), \Windows\System32\config\{SOFTWARE,
#     SYSTEM}, a .sys file under \Windows\System32\drivers for each driver installed;
#   - BIOS variants: MBR (sfdisk), the NTFS partition active, non-GRUB boot code in the MBR, \bootmgr and
#     \Boot\BCD on the volume; UEFI variants: GPT with a 32 MiB FAT16 ESP (\EFI\BOOT\BOOTX64.EFI as a PE header,
#     \EFI\Microsoft\Boot\BCD) and a Microsoft basic data partition.
#
#   mkwindows.sh OUTDIR            writes OUTDIR/<variant>.raw for every variant below
#
# Variants (tests/windows.rs holds the verdicts expected of each):
#   server2019   Windows Server 2019 Datacenter 10.0.17763, BIOS; viostor/vioscsi/netkvm, AWSNVMe+ena, AWSPVStorage,
#                storvsc/vmbus/netvsc, storahci; not generalised; computer name WIN2019
#   server2016   Windows Server 2016 Standard 10.0.14393, BIOS; stornvme on demand, no AWSNVMe, no ena, no virtio;
#                storvsc/vmbus/netvsc, storahci; not generalised
#   win11        Windows 11 Pro 10.0.22631 (23H2), UEFI only; stornvme boot, storahci, storvsc/vmbus/netvsc; no
#                virtio, no ena; not generalised
#   sysprep      as server2019, generalised: ImageState IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE, SYSTEM\Setup
#                SystemSetupInProgress=1 CmdLine oobe\windeploy.exe
#   controlset2  SYSTEM\Select\Current=2: ControlSet001 (computer name OLD-NAME) has viostor at boot,
#                ControlSet002 (WIN-CS2) does not (storahci only); SOFTWARE as server2019
#   server2008   Windows Server 2008 R2 Datacenter 6.1.7601, UEFI only; storvsc/vmbus/netvsc, storahci
#   sysreserved  as server2019, laid out as Windows Setup does on BIOS: an 8 MiB "System Reserved" NTFS partition
#                (sda1, active) holds \bootmgr and \Boot\BCD; Windows (sda2) has neither
set -euo pipefail

out=${1:?usage: mkwindows.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
hive_minimal=$here/../data/windows/hive-minimal
for t in hivexregedit mkntfs guestfish sfdisk mkfs.vfat mmd mcopy; do
  command -v "$t" >/dev/null || {
    echo "mkwindows.sh: $t is missing: run .ci/install-deps (libwin-hivex-perl, ntfs-3g, libguestfs-tools, fdisk, dosfstools, mtools)" >&2
    exit 1
  }
done
[ -f "$hive_minimal" ] || { echo "mkwindows.sh: $hive_minimal is missing" >&2; exit 1; }
# libguestfs on this machine: the cached kernel, TCG.
eval "$(bash "$here/guestfs-env.sh" | sed 's/^/export /')"

mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/mkwindows.XXXXXX")
trap 'rm -rf "$work"' EXIT

variants=(server2019 server2016 win11 sysprep controlset2 server2008 sysreserved)
DISK_MIB=64
NTFS_START_MIB=34   # after the ESP on GPT; the MBR variants use the same offset
NTFS_MIB=28

# A minimal PE image: MZ, e_lfanew = 0x80, "PE\0\0", machine AMD64.
pe() {
  { printf 'MZ'; head -c 58 /dev/zero; printf '\x80\x00\x00\x00'; head -c 64 /dev/zero
    printf 'PE\0\0\x64\x86'; head -c 378 /dev/zero; } >"$1"
}

# reg_software VARIANT: the SOFTWARE .reg
reg_software() {
  local product edition type major minor build display="" state=IMAGE_STATE_COMPLETE cv=6.3
  case $1 in
    server2019|controlset2|sysprep|sysreserved) product="Windows Server 2019 Datacenter" edition=ServerDatacenter type=Server major=10 minor=0 build=17763 ;;
    server2016) product="Windows Server 2016 Standard" edition=ServerStandard type=Server major=10 minor=0 build=14393 ;;
    win11) product="Windows 11 Pro" edition=Professional type=Client major=10 minor=0 build=22631 display=23H2 ;;
    server2008) product="Windows Server 2008 R2 Datacenter" edition=ServerDatacenter type=Server major="" minor="" build=7601 cv=6.1 ;;
  esac
  [ "$1" = sysprep ] && state=IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE
  cat <<EOF
Windows Registry Editor Version 5.00

[\\Microsoft]

[\\Microsoft\\Windows NT]

[\\Microsoft\\Windows NT\\CurrentVersion]
"ProductName"="$product"
"EditionID"="$edition"
"InstallationType"="$type"
"CurrentVersion"="$cv"
"CurrentBuild"="$build"
"CurrentBuildNumber"="$build"
EOF
  [ -n "$major" ] && printf '"CurrentMajorVersionNumber"=dword:%08x\n"CurrentMinorVersionNumber"=dword:%08x\n' "$major" "$minor"
  [ -n "$display" ] && printf '"DisplayVersion"="%s"\n' "$display"
  cat <<EOF

[\\Microsoft\\Windows]

[\\Microsoft\\Windows\\CurrentVersion]

[\\Microsoft\\Windows\\CurrentVersion\\Setup]

[\\Microsoft\\Windows\\CurrentVersion\\Setup\\State]
"ImageState"="$state"

EOF
}

# drivers_of VARIANT SET: "name:start" pairs installed in that control set
drivers_of() {
  case $1:$2 in
    server2019:1|sysprep:1|controlset2:1|sysreserved:1)
      echo "viostor:0 vioscsi:0 netkvm:3 AWSNVMe:0 stornvme:3 ena:3 AWSPVStorage:0 xenvbd:4 storvsc:0 vmbus:0 netvsc:3 storahci:0 pciide:3 atapi:3" ;;
    controlset2:2) echo "stornvme:3 storvsc:0 vmbus:0 netvsc:3 storahci:0 pciide:3 atapi:3" ;;
    server2016:1) echo "stornvme:3 storvsc:0 vmbus:0 netvsc:3 storahci:0 pciide:3 atapi:3" ;;
    win11:1) echo "stornvme:0 storvsc:0 vmbus:0 netvsc:3 storahci:0 pciide:3" ;;
    server2008:1) echo "storvsc:0 vmbus:0 netvsc:3 msahci:0 pciide:0 atapi:0" ;;
  esac
}

hostname_of() {
  case $1:$2 in
    server2019:*|sysprep:*|sysreserved:*) echo WIN2019 ;;
    server2016:*) echo WIN2016 ;;
    win11:*) echo DESKTOP-W11 ;;
    controlset2:1) echo OLD-NAME ;;
    controlset2:2) echo WIN-CS2 ;;
    server2008:*) echo WIN2008 ;;
  esac
}

# reg_system VARIANT: the SYSTEM .reg
reg_system() {
  local current=1 sets=1 cs name drv s
  if [ "$1" = controlset2 ]; then current=2 sets="1 2"; fi
  cat <<EOF
Windows Registry Editor Version 5.00

[\\Select]
"Current"=dword:$(printf %08x "$current")
"Default"=dword:$(printf %08x "$current")
"LastKnownGood"=dword:00000001

[\\Setup]
EOF
  if [ "$1" = sysprep ]; then
    printf '"SystemSetupInProgress"=dword:00000001\n"CmdLine"="oobe\\\\windeploy.exe"\n'
  else
    printf '"SystemSetupInProgress"=dword:00000000\n"CmdLine"=""\n'
  fi
  echo
  for s in $sets; do
    cs=$(printf 'ControlSet%03d' "$s")
    printf '[\\%s]\n\n[\\%s\\Control]\n\n[\\%s\\Control\\ComputerName]\n\n' "$cs" "$cs" "$cs"
    printf '[\\%s\\Control\\ComputerName\\ComputerName]\n"ComputerName"="%s"\n\n' "$cs" "$(hostname_of "$1" "$s")"
    printf '[\\%s\\Services]\n\n' "$cs"
    for drv in $(drivers_of "$1" "$s"); do
      name=${drv%%:*}
      printf '[\\%s\\Services\\%s]\n"Start"=dword:%08x\n"Type"=dword:00000001\n' "$cs" "$name" "${drv##*:}"
      printf '"ImagePath"="System32\\\\drivers\\\\%s.sys"\n\n' "$name"
    done
  done
}

uefi() { [ "$1" = win11 ] || [ "$1" = server2008 ]; }

pe "$work/ntoskrnl.exe"
pe "$work/BOOTX64.EFI"
printf 'BCD store placeholder (regf hive in a real one)\n' >"$work/BCD"
printf 'bootmgr placeholder\n' >"$work/bootmgr"

echo run >"$work/gf.script"
letters=(a b c d e f g h)
i=0
add=()
for v in "${variants[@]}"; do
  d=$work/$v
  mkdir -p "$d"
  cp "$hive_minimal" "$d/SOFTWARE" && chmod u+w "$d/SOFTWARE"
  cp "$hive_minimal" "$d/SYSTEM" && chmod u+w "$d/SYSTEM"
  reg_software "$v" >"$d/software.reg"
  reg_system "$v" >"$d/system.reg"
  hivexregedit --merge --prefix 'HKEY_LOCAL_MACHINE\SOFTWARE' "$d/SOFTWARE" "$d/software.reg"
  hivexregedit --merge --prefix 'HKEY_LOCAL_MACHINE\SYSTEM' "$d/SYSTEM" "$d/system.reg"
  truncate -s "${NTFS_MIB}M" "$d/ntfs.img"
  mkntfs -q -F -Q -s 512 -p $((NTFS_START_MIB * 2048)) -H 255 -S 63 -L "$v" "$d/ntfs.img" >/dev/null 2>&1
  add+=(-a "$d/ntfs.img")
  dev=/dev/sd${letters[$i]}
  {
    echo "mount $dev /"
    echo "mkdir-p /Windows/System32/config"
    echo "mkdir-p /Windows/System32/drivers"
    echo "upload $work/ntoskrnl.exe /Windows/System32/ntoskrnl.exe"
    echo "upload $d/SOFTWARE /Windows/System32/config/SOFTWARE"
    echo "upload $d/SYSTEM /Windows/System32/config/SYSTEM"
    for s in 1 2; do
      for dr in $(drivers_of "$v" "$s"); do
        echo "write /Windows/System32/drivers/${dr%%:*}.sys \"driver ${dr%%:*}\""
      done
    done
    if ! uefi "$v" && [ "$v" != sysreserved ]; then
      echo "upload $work/bootmgr /bootmgr"
      echo "mkdir-p /Boot"
      echo "upload $work/BCD /Boot/BCD"
    fi
    echo "umount /"
  } >>"$work/gf.script"
  i=$((i + 1))
  if [ "$v" = sysreserved ]; then
    truncate -s 8M "$d/sr.img"
    mkntfs -q -F -Q -s 512 -p 2048 -H 255 -S 63 -L "System Reserved" "$d/sr.img" >/dev/null 2>&1
    add+=(-a "$d/sr.img")
    {
      echo "mount /dev/sd${letters[$i]} /"
      echo "upload $work/bootmgr /bootmgr"
      echo "mkdir-p /Boot"
      echo "upload $work/BCD /Boot/BCD"
      echo "umount /"
    } >>"$work/gf.script"
    i=$((i + 1))
  fi
done
guestfish --format=raw "${add[@]}" -f "$work/gf.script"

for v in "${variants[@]}"; do
  d=$work/$v
  img=$out/$v.raw.tmp
  rm -f "$img"
  truncate -s "${DISK_MIB}M" "$img"
  if uefi "$v"; then
    sfdisk -q "$img" <<EOF
label: gpt
start=2048, size=$((32 * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system partition"
start=$((NTFS_START_MIB * 2048)), size=$((NTFS_MIB * 2048)), type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="Basic data partition"
EOF
    mkfs.vfat -F 16 --offset 2048 -i ABCD1234 "$img" $((32 * 1024)) >/dev/null 2>&1
    m="$img@@$((2048 * 512))"
    mmd -i "$m" ::/EFI ::/EFI/BOOT ::/EFI/Microsoft ::/EFI/Microsoft/Boot
    mcopy -i "$m" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$m" "$work/BOOTX64.EFI" ::/EFI/Microsoft/Boot/bootmgfw.efi
    mcopy -i "$m" "$work/BCD" ::/EFI/Microsoft/Boot/BCD
  elif [ "$v" = sysreserved ]; then
    sfdisk -q "$img" <<EOF
label: dos
start=2048, size=$((8 * 2048)), type=7, bootable
start=$((NTFS_START_MIB * 2048)), size=$((NTFS_MIB * 2048)), type=7
EOF
    printf 'imgshift test: Windows MBR boot code stand-in' | dd of="$img" conv=notrunc status=none
    dd if="$d/sr.img" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
  else
    sfdisk -q "$img" <<EOF
label: dos
start=$((NTFS_START_MIB * 2048)), size=$((NTFS_MIB * 2048)), type=7, bootable
EOF
    # Boot code (not GRUB's) in the MBR's first 440 bytes: what a BIOS runs to find the active partition.
    printf 'imgshift test: Windows MBR boot code stand-in' | dd of="$img" conv=notrunc status=none
  fi
  dd if="$d/ntfs.img" of="$img" bs=1M seek="$NTFS_START_MIB" conv=notrunc,sparse status=none
  mv "$img" "$out/$v.raw"
done
