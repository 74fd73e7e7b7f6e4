#!/usr/bin/env bash
# Prints (KEY=VALUE lines) the environment libguestfs needs on a machine without a host kernel in /boot and with a
# broken KVM: the appliance kernel is the Debian kernel mkguest.sh caches (run it first), TCG is forced, and the
# appliance cache stays under /var/tmp. `mkdir -p /lib/modules` is done here (supermin lstat()s it).
#   eval "$(bash tests/guests/guestfs-env.sh | sed 's/^/export /')"
set -euo pipefail
cache=${IMGSHIFT_GUEST_CACHE:-/var/tmp/imgshift-guest-cache}
ktree=$(ls -d "$cache"/linux-image-6.1.0-*-amd64 2>/dev/null | sort -V | while read -r d; do [ -e "$d/.done" ] && echo "$d"; done | tail -1)
[ -n "$ktree" ] || { echo "guestfs-env.sh: no cached kernel in $cache: run tests/guests/mkguest.sh first" >&2; exit 1; }
kver=$(basename "$ktree"); kver=${kver#linux-image-}
mkdir -p /lib/modules /var/tmp/imgshift-guestfs-cache
echo "LIBGUESTFS_BACKEND=direct"
echo "LIBGUESTFS_BACKEND_SETTINGS=force_tcg"
echo "LIBGUESTFS_CACHEDIR=/var/tmp/imgshift-guestfs-cache"
echo "SUPERMIN_KERNEL=$ktree/boot/vmlinuz-$kver"
echo "SUPERMIN_MODULES=$ktree/lib/modules/$kver"
