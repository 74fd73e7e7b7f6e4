#!/usr/bin/env bash
# Fetches the test guests' kernel into the guest cache (an install step: .ci/install-deps runs it; the tests
# never download anything). The package is the one tests/guests/kernel.pin names (IMGSHIFT_KERNEL_PKG overrides);
# when the mirror no longer carries it, the one linux-image-amd64 depends on, with a warning to update the pin.
# Leaves $cache/PKG/ (the unpacked .deb with modules.dep made by `depmod -b`, and a .done marker) and
# $cache/kernel.pkg (the package name mkguest.sh and guestfs-env.sh use). Idempotent: a cached kernel is kept.
#   bash tests/guests/fetch-kernel.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${IMGSHIFT_GUEST_CACHE:-/var/tmp/imgshift-guest-cache}
mkdir -p "$cache"
for c in apt-get apt-cache dpkg-deb depmod flock; do
  command -v "$c" >/dev/null || { echo "fetch-kernel.sh: $c is missing" >&2; exit 1; }
done

pin=${IMGSHIFT_KERNEL_PKG:-$(grep -v '^#' "$here/kernel.pin" | grep -m1 -o 'linux-image-[^ ]*')}
[ -n "$pin" ] || { echo "fetch-kernel.sh: no package named in $here/kernel.pin" >&2; exit 1; }

# download PKG into DIR (a fresh temporary folder); fails quietly when the mirror lacks it.
download() { (cd "$2" && apt-get download "$1" >/dev/null 2>&1); }

fetch() {
  local pkg=$1 dir=$cache/$1 t
  [ -e "$dir/.done" ] && return 0
  t=$(mktemp -d "$cache/.dl.XXXXXX")
  if ! download "$pkg" "$t"; then
    rm -rf "$t"
    return 1
  fi
  mkdir "$t/root"
  dpkg-deb -x "$t"/*.deb "$t/root"
  depmod -b "$t/root" "${pkg#linux-image-}"
  rm -rf "$dir" && mv "$t/root" "$dir" && rm -rf "$t" && touch "$dir/.done"
}

(
  flock 9
  pkg=$pin
  if ! fetch "$pkg"; then
    apt-cache show "$pkg" >/dev/null 2>&1 || apt-get update -qq
    if ! fetch "$pkg"; then
      newest=$(apt-cache depends linux-image-amd64 2>/dev/null | grep -o 'linux-image-6\.1\.0-[0-9]*-amd64' | head -1)
      [ -n "$newest" ] && fetch "$newest" || {
        echo "fetch-kernel.sh: cannot download $pin${newest:+ nor $newest} (apt-get update? network?)" >&2
        exit 1
      }
      echo "fetch-kernel.sh: WARNING: $pin is no longer on the mirror; fetched $newest instead:" \
        "update tests/guests/kernel.pin to it" >&2
      pkg=$newest
    fi
  fi
  echo "$pkg" >"$cache/kernel.pkg.tmp" && mv "$cache/kernel.pkg.tmp" "$cache/kernel.pkg"
  echo "guest kernel: $pkg in $cache"
) 9>"$cache/.lock"
