#!/usr/bin/env bash
# Build the colo test/demo guest from Debian packages only:
#   - the Debian 12 (bookworm) 6.1 generic kernel  linux-image-6.1.0-N-amd64
#   - busybox-static
# Output (in the cache dir): vmlinuz, initramfs.cpio.gz, guest.env (versions, hashes).
#
# Cache dir: $COLO_CACHE/guest if COLO_CACHE is set, else <repo>/.cache/guest (git-ignored).
# Idempotent: does nothing when the outputs match the package versions and the guest scripts.
# Reproducible: the initramfs is built with sorted entries, fixed mtimes, uid/gid 0 (cpio
# --reproducible, gzip -n), so two builds from the same packages give the same sha256.
#
# Usage: scripts/build-guest.sh [--force] [--print-dir]
#   --force      rebuild even if up to date
#   --print-dir  print the output directory and exit (builds nothing)
# Environment:
#   COLO_CACHE              cache root (default <repo>/.cache)
#   COLO_GUEST_KERNEL_PKG   kernel package to use (default: what linux-image-amd64 depends on)
set -euo pipefail

die() { echo "build-guest: error: $*" >&2; exit 1; }
log() { echo "build-guest: $*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache_root="${COLO_CACHE:-$repo/.cache}"
out="$cache_root/guest"

force=0
for a in "$@"; do
    case "$a" in
        --force) force=1 ;;
        --print-dir) echo "$out"; exit 0 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument '$a' (try --help)" ;;
    esac
done

for t in apt-cache apt-get dpkg-deb gzip sha256sum flock find sort; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found (this script needs a Debian host)"
done

mkdir -p "$out/debs"
# Several tests may build at once: one builder at a time, the others wait and then find it done.
exec 9>"$out/.lock"
flock -w 900 9 || die "timed out waiting for another build-guest.sh (lock $out/.lock)"

# --- fast path: nothing changed since the last build ---------------------------------------------
# Our own inputs (this script, the guest files, the override) and a fingerprint of apt's package
# lists: if both match guest.env, the candidate versions cannot have changed and apt-cache (slow
# on a loaded machine) is not asked at all.
scripts_hash="$( {
    sha256sum <"$0"
    (cd "$here/guest" && find . -type f ! -name '*.md' | LC_ALL=C sort | xargs sha256sum)
    echo "kernel-override=${COLO_GUEST_KERNEL_PKG:-}"
} | sha256sum | cut -d' ' -f1)"
lists_hash="$(ls -l --time-style=+%s /var/lib/apt/lists 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$force" = 0 ] && [ -f "$out/guest.env" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] \
    && grep -qx "GUEST_SCRIPTS_SHA256=$scripts_hash" "$out/guest.env" \
    && grep -qx "GUEST_APT_LISTS_SHA256=$lists_hash" "$out/guest.env"; then
    log "up to date: $out ($(grep '^GUEST_KERNEL_PKG=' "$out/guest.env" | cut -d= -f2))"
    exit 0
fi

# --- which packages --------------------------------------------------------------------------
pkg_version() { # newest candidate version of package $1, or empty
    apt-cache policy "$1" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2 }'
}

kpkg="${COLO_GUEST_KERNEL_PKG:-}"
if [ -z "$kpkg" ]; then
    kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '!found && $1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/ { print $2; found = 1 }')"
    if [ -z "$kpkg" ]; then
        # Fall back to the newest generic 6.1 image apt knows about.
        kpkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null \
            | awk '{ print $1 }' | sort -V | tail -n 1)"
    fi
fi
[ -n "$kpkg" ] || die "no Debian 6.1 kernel package found by apt-cache (linux-image-6.1.0-*-amd64).
  Is this Debian 12 (bookworm) with package lists? Run: apt-get update"
case "$kpkg" in
    *cloud*|*-rt-*) die "kernel package '$kpkg' is not the generic flavour (need linux-image-6.1.0-N-amd64)" ;;
esac
kver_pkg="$(pkg_version "$kpkg")"
[ -n "$kver_pkg" ] || die "apt-cache has no candidate version for '$kpkg'. Run: apt-get update"
bpkg=busybox-static
bver_pkg="$(pkg_version "$bpkg")"
[ -n "$bver_pkg" ] || die "apt-cache has no candidate version for '$bpkg'. Run: apt-get update"
kuname="${kpkg#linux-image-}"

# The inputs that define the build: package versions and our own guest files.
inputs_hash="$(printf '%s\n' "$kpkg=$kver_pkg" "$bpkg=$bver_pkg" "$scripts_hash" | sha256sum | cut -d' ' -f1)"

if [ "$force" = 0 ] && [ -f "$out/guest.env" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] \
    && grep -qx "GUEST_INPUTS_SHA256=$inputs_hash" "$out/guest.env"; then
    # Same packages after an apt-get update: only the lists fingerprint is new.
    sed -i "s/^GUEST_APT_LISTS_SHA256=.*/GUEST_APT_LISTS_SHA256=$lists_hash/" "$out/guest.env"
    log "up to date: $out ($kpkg $kver_pkg, $bpkg $bver_pkg)"
    exit 0
fi

# --- download ----------------------------------------------------------------------------------
deb_file() { # $1 pkg, $2 version -> path of the .deb in the cache (download if missing)
    local pkg="$1" ver="$2" f
    # apt names files pkg_version_arch.deb with ':' in the version escaped as %3a.
    f="$(find "$out/debs" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" -print -quit)"
    if [ -z "$f" ]; then
        log "downloading $pkg=$ver"
        if ! (cd "$out/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2); then
            die "cannot fetch Debian package '$pkg=$ver' (apt-get download failed; network? try: apt-get update)"
        fi
        f="$(find "$out/debs" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" -print -quit)"
        [ -n "$f" ] || die "apt-get download of '$pkg=$ver' produced no .deb in $out/debs"
    fi
    dpkg-deb --info "$f" >/dev/null 2>&1 || { rm -f "$f"; die "corrupt package $f removed; run again"; }
    echo "$f"
}
kdeb="$(deb_file "$kpkg" "$kver_pkg")"
bdeb="$(deb_file "$bpkg" "$bver_pkg")"

# --- extract and assemble ----------------------------------------------------------------------
work="$(mktemp -d "$out/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "extracting $(basename "$kdeb") and $(basename "$bdeb")"
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bdeb" "$work/busybox"

vmlinuz="$work/kernel/boot/vmlinuz-$kuname"
[ -f "$vmlinuz" ] || die "$kdeb has no boot/vmlinuz-$kuname"
moddir="$work/kernel/lib/modules/$kuname"
[ -d "$moddir" ] || die "$kdeb has no lib/modules/$kuname"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root,lib/modules,usr/bin,usr/sbin,var/log}
install -m 0755 "$work/busybox/bin/busybox" "$root/bin/busybox"
# Applet links are made at build time so the image is complete without a first-boot step.
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -s busybox "$root/bin/$applet"
done

# Modules, in load order (virtio-MMIO over ACPI, virtio-PCI, net and block).
modules="virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk"
: >"$root/lib/modules/load-order"
for m in $modules; do
    f="$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) -print -quit)"
    [ -n "$f" ] || die "module $m not found in $kdeb"
    case "$f" in
        *.ko) install -m 0644 "$f" "$root/lib/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$root/lib/modules/load-order"
done

# Our init and services.
install -m 0755 "$here/guest/init" "$root/init"
mkdir -p "$root/etc/colo"
for f in "$here"/guest/services/*; do
    install -m 0755 "$f" "$root/etc/colo/$(basename "$f")"
done
mkdir -p "$root/www/cgi-bin"
cp -r "$here/guest/www/." "$root/www/"
chmod 0755 "$root"/www/cgi-bin/* 2>/dev/null || true
bb_version="$("$root/bin/busybox" 2>&1 | awk 'NR == 1 { print $2 }')"
cat >"$root/etc/colo/guest.env" <<EOF
GUEST_KERNEL_PKG=$kpkg
GUEST_KERNEL_VERSION=$kver_pkg
GUEST_BUSYBOX_VERSION=$bver_pkg
EOF

# --- pack ----------------------------------------------------------------------------------
epoch="${SOURCE_DATE_EPOCH:-0}"
find "$root" -exec touch -h -d "@$epoch" {} +
newc() { # archive of the current directory on stdout
    if command -v cpio >/dev/null 2>&1 && cpio --help 2>&1 | grep -q -- --reproducible; then
        find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible
    else
        log "warning: GNU cpio not found, using busybox cpio (the image is not byte-reproducible)"
        find . -mindepth 1 | LC_ALL=C sort | "$root/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null
    fi
}
(cd "$root" && newc) | gzip -n -9 >"$work/initramfs.cpio.gz"
cp "$vmlinuz" "$work/vmlinuz"

initrd_sha="$(sha256sum "$work/initramfs.cpio.gz" | cut -d' ' -f1)"
kernel_sha="$(sha256sum "$work/vmlinuz" | cut -d' ' -f1)"
cat >"$work/guest.env" <<EOF
# Written by scripts/build-guest.sh. Shell-sourceable.
GUEST_KERNEL_PKG=$kpkg
GUEST_KERNEL_VERSION=$kver_pkg
GUEST_KERNEL_RELEASE=$kuname
GUEST_BUSYBOX_PKG=$bpkg
GUEST_BUSYBOX_VERSION=$bver_pkg
GUEST_BUSYBOX_APPLET_VERSION=$bb_version
GUEST_MODULES="$modules"
GUEST_VMLINUZ=vmlinuz
GUEST_INITRD=initramfs.cpio.gz
GUEST_VMLINUZ_SHA256=$kernel_sha
GUEST_INITRD_SHA256=$initrd_sha
GUEST_INPUTS_SHA256=$inputs_hash
GUEST_SCRIPTS_SHA256=$scripts_hash
GUEST_APT_LISTS_SHA256=$lists_hash
EOF
# Replace the outputs; guest.env last, so a half-finished build never looks up to date.
rm -f "$out/guest.env"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
mv -f "$work/guest.env" "$out/guest.env"
# Keep only the .debs of the current versions.
find "$out/debs" -maxdepth 1 -name '*.deb' ! -path "$kdeb" ! -path "$bdeb" -delete
log "built $out: $kpkg $kver_pkg, busybox $bver_pkg, initramfs sha256 $initrd_sha"
