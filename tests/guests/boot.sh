#!/usr/bin/env bash
# Boots a test guest (tests/guests/mkguest.sh) under QEMU with TCG and reports its marker line.
#
#   boot.sh IMG FMT [bios|uefi] [virtio|sata|ide|nvme|scsi]      (defaults: bios virtio)
#
# The image is never written: QEMU runs with -snapshot (writes go to a temporary overlay). UEFI uses OVMF as
# pflash (the CODE file read-only, a private copy of VARS). KVM on these machines is kvm-pvm and hangs Debian
# kernels, so this is TCG only. Prints the marker line (IMGSHIFT-BOOT-OK ..., IMGSHIFT-NO-ROOT, or
# "NO-MARKER <reason>") and exits 0 iff IMGSHIFT-BOOT-OK was seen. BOOT_TIMEOUT (seconds, default 90) bounds
# the run; BOOT_LOG=FILE keeps the whole serial log; BOOT_MEM overrides the guest RAM in MiB.
set -euo pipefail
img=${1:?usage: boot.sh IMG FMT [bios|uefi] [virtio|sata|ide|nvme|scsi]}
fmt=${2:?usage: boot.sh IMG FMT [bios|uefi] [virtio|sata|ide|nvme|scsi]}
fw=${3:-bios}
bus=${4:-virtio}
timeout_s=${BOOT_TIMEOUT:-90}
command -v qemu-system-x86_64 >/dev/null || {
  echo "boot.sh: qemu-system-x86_64 is missing: run .ci/install-deps" >&2
  exit 2
}
[ -r "$img" ] || {
  echo "boot.sh: cannot read $img" >&2
  exit 2
}

work=$(mktemp -d "${TMPDIR:-/tmp}/bootsh.XXXXXX")
trap 'rm -rf "$work"' EXIT
log=$work/serial.log

# 256 MiB for BIOS; UEFI needs 512: with 256, Debian's GRUB 2.06 EFI fails to load the 8 MB kernel ("error: out
# of memory") under OVMF.
mem=${BOOT_MEM:-256}
[ "$fw" = uefi ] && mem=${BOOT_MEM:-512}
args=(-accel tcg -m "$mem" -nographic -no-reboot -nic none -snapshot -monitor none -serial "file:$log")
case $fw in
  bios) ;;
  uefi)
    code=/usr/share/OVMF/OVMF_CODE_4M.fd vars=/usr/share/OVMF/OVMF_VARS_4M.fd
    [ -r "$code" ] && [ -r "$vars" ] || {
      echo "boot.sh: OVMF is missing ($code): run .ci/install-deps" >&2
      exit 2
    }
    cp "$vars" "$work/vars.fd"
    args+=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$code"
      -drive "if=pflash,format=raw,unit=1,file=$work/vars.fd")
    ;;
  *)
    echo "boot.sh: firmware must be bios or uefi, not $fw" >&2
    exit 2
    ;;
esac
drive="file=$img,format=$fmt,readonly=off"
case $bus in
  virtio) args+=(-drive "$drive,if=virtio") ;;
  ide) args+=(-drive "$drive,if=ide") ;;
  sata) args+=(-drive "$drive,if=none,id=d0" -device ahci,id=ahci0 -device ide-hd,drive=d0,bus=ahci0.0) ;;
  nvme) args+=(-drive "$drive,if=none,id=d0" -device nvme,drive=d0,serial=imgshift0) ;;
  scsi) args+=(-drive "$drive,if=none,id=d0" -device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=d0,bus=scsi0.0) ;;
  *)
    echo "boot.sh: bus must be virtio, sata, ide, nvme or scsi, not $bus" >&2
    exit 2
    ;;
esac

start=$(date +%s.%N)
set +e
timeout --foreground -k 5 "$timeout_s" qemu-system-x86_64 "${args[@]}" </dev/null >"$work/qemu.out" 2>&1
rc=$?
set -e
secs=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")
[ -n "${BOOT_LOG:-}" ] && cp "$log" "$BOOT_LOG" 2>/dev/null || true
marker=$(grep -a -o -m1 -E 'IMGSHIFT-(BOOT-OK|NO-ROOT)[^[:cntrl:]]*' "$log" 2>/dev/null || true)
if [ -z "$marker" ]; then
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    marker="NO-MARKER timeout after ${timeout_s}s"
  else
    marker="NO-MARKER qemu exit $rc: $(tr -d '\r' <"$work/qemu.out" | tail -1)"
  fi
fi
echo "$marker"
echo "boot.sh: $fw/$bus $fmt ${secs}s" >&2
case $marker in IMGSHIFT-BOOT-OK*) exit 0 ;; *) exit 1 ;; esac
