#!/usr/bin/env bash
# Prints (KEY=VALUE lines) the environment libguestfs needs on a machine without a host kernel in /boot and with a
# broken KVM: the appliance kernel is the Debian kernel .ci/install-deps caches (tests/guests/fetch-kernel.sh), TCG is forced, and the
# appliance cache stays under /var/tmp. `mkdir -p /lib/modules` is done here (supermin lstat()s it).
#   eval "$(bash tests/guests/guestfs-env.sh | sed 's/^/export /')"
set -euo pipefail
cache=${IMGSHIFT_GUEST_CACHE:-/var/tmp/imgshift-guest-cache}
pkg=${IMGSHIFT_KERNEL_PKG:-$(cat "$cache/kernel.pkg" 2>/dev/null || true)}
ktree=$cache/$pkg
[ -n "$pkg" ] && [ -e "$ktree/.done" ] || {
  echo "guestfs-env.sh: no test guest kernel in $cache: fetch it with \`bash .ci/install-deps\`" >&2
  exit 1
}
kver=$(basename "$ktree"); kver=${kver#linux-image-}
mkdir -p /lib/modules /var/tmp/imgshift-guestfs-cache
echo "LIBGUESTFS_BACKEND=direct"
echo "LIBGUESTFS_BACKEND_SETTINGS=force_tcg"
echo "LIBGUESTFS_CACHEDIR=/var/tmp/imgshift-guestfs-cache"
echo "SUPERMIN_KERNEL=$ktree/boot/vmlinuz-$kver"
echo "SUPERMIN_MODULES=$ktree/lib/modules/$kver"
