#!/usr/bin/env bash
# Build and cache the Debian 12 (bookworm) system image the installer's and the
# Debian packages' system tests boot under qemu (tests/installer/system.py), or
# another release's for the release-upgrade scenarios (`make test-long`):
# a real system — systemd as PID 1, udev, journald, systemd-networkd (DHCP on
# the virtio NIC), OpenSSH server, the distribution kernel — on a raw ext4
# disk, with the image's own vmlinuz and initrd.img next to it for
# `qemu -kernel`, and root's SSH key for the tests.
#
#   tests/installer/system-image.sh [SUITE]     bookworm (default), bullseye or trixie
#
# Cached outside the repository, in $SYSTEM_IMAGE_CACHE (default
# /var/cache/mitigator-agent-tests; another SUITE's in its SUITE/ subdirectory):
#
#   SUITE.raw             4 GiB sparse raw ext4 image (the root file system)
#   vmlinuz, initrd.img   the image's kernel and initramfs
#   kernel-release        that kernel's `uname -r`
#   id_ed25519(.pub)      the key root accepts over SSH (made by the first build, 0600)
#   image.stamp           what the cached image was built from (written last)
#
# Idempotent: does nothing when the image exists, was built by this very
# script (its SHA-256 is in the stamp) and is younger than
# $SYSTEM_IMAGE_MAX_AGE_DAYS (default 7), else rebuilds it from scratch. The
# age limit keeps it current with the archive: once a kernel update moves
# bookworm on, the image kernel's headers package leaves the mirror's lists
# and an install in an old image could not find it after `apt-get update`. Nothing
# is installed in the image beyond a minimal server; the packages an install
# of mitigator-agent pulls (dkms, the kernel's headers, python3-venv, openssl,
# mokutil and their dependencies) are only downloaded into apt's cache, and apt
# keeps what it downloads, so the installer's apt step is real but fast.
#
# Everything it says goes to stderr (tests/provision-host.sh's stdout is the
# kernel list the Makefile reads).
set -euo pipefail
umask 022  # the image's files get their modes from what is written here

SELF=$(readlink -f "$0")
SUITE=${1:-bookworm}
case $SUITE in
    bullseye) RELEASE=11 ;;
    bookworm) RELEASE=12 ;;
    trixie) RELEASE=13 ;;
    *) echo "system-image: unknown suite '$SUITE': bullseye, bookworm or trixie" >&2; exit 1 ;;
esac
CACHE=${SYSTEM_IMAGE_CACHE:-/var/cache/mitigator-agent-tests}
[ "$SUITE" = bookworm ] || CACHE=$CACHE/$SUITE
MAX_AGE_DAYS=${SYSTEM_IMAGE_MAX_AGE_DAYS:-7}
IMAGE_SIZE=4G

# The minimal server: what boots and what the tests reach it with. No sudo
# (everything runs as root), no python3-venv (the installer installs it).
# ca-certificates (with openssl) as on any standard Debian server, where wget
# and most else pull it in; without it every install in the image would also
# pay for update-ca-certificates, minutes of shell loops under TCG.
PACKAGES=(
    systemd systemd-sysv udev dbus
    openssh-server
    iproute2 kmod procps netbase
    passwd adduser
    python3
    ca-certificates
)
# What an install of mitigator-agent on this server asks apt for; downloaded
# into the image's apt cache only. linux-headers-KVER is added for the image's
# kernel.
PREDOWNLOAD=(dkms python3-venv openssl mokutil)

say() { echo "system-image: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot); run it as root"
for tool in debootstrap mkfs.ext4 ssh-keygen sha256sum flock; do
    command -v "$tool" >/dev/null ||
        die "$tool is missing; run tests/provision-host.sh (it installs the host's packages)"
done

# --- the host's Debian mirror ------------------------------------------------

# uri_for SUITE: the URI of the host's deb822 stanza (debian.sources) that
# lists SUITE, or nothing.
uri_for() {
    local f=/etc/apt/sources.list.d/debian.sources
    [ -f "$f" ] || return 0
    awk -v want="$1" '
        /^[ \t]*$/ { if (hit && uri != "") { print uri; exit } hit = 0; uri = ""; next }
        /^URIs:/   { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
        END        { if (hit && uri != "") print uri }' "$f" | head -n 1
}

MIRROR=$(uri_for "$SUITE")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
SECURITY=$(uri_for "$SUITE-security")
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
SECURITY=${SECURITY%/}

# --- up to date? ------------------------------------------------------------

mkdir -p "$CACHE"
chmod 0755 "$CACHE"
# One build at a time (two `make test` runs may start together).
exec 9>"$CACHE/.lock"
flock 9

want="script=$(sha256sum "$SELF" | cut -d' ' -f1) suite=$SUITE mirror=$MIRROR security=$SECURITY"
outputs=("$SUITE.raw" vmlinuz initrd.img kernel-release id_ed25519 id_ed25519.pub)
up_to_date() {
    local f
    [ "$(cat "$CACHE/image.stamp" 2>/dev/null)" = "$want" ] || return 1
    for f in "${outputs[@]}"; do [ -s "$CACHE/$f" ] || return 1; done
}
too_old() {
    [ -n "$(find "$CACHE/image.stamp" -mtime "+$((MAX_AGE_DAYS - 1))" 2>/dev/null)" ]
}
case $MAX_AGE_DAYS in
    ''|*[!0-9]*|0) die "SYSTEM_IMAGE_MAX_AGE_DAYS=$MAX_AGE_DAYS: give a whole number of days, 1 or more" ;;
esac
if up_to_date && ! too_old; then
    say "up to date: $CACHE/$SUITE.raw (kernel $(cat "$CACHE/kernel-release"), built $(date -r "$CACHE/image.stamp" '+%F %R'))"
    exit 0
fi
if up_to_date; then
    say "the cached image is more than $MAX_AGE_DAYS days old: rebuilding with the archive's current packages"
elif [ -e "$CACHE/image.stamp" ]; then
    say "the cached image was built by another version of $SELF: rebuilding"
else
    say "no image in $CACHE yet: building"
fi

# --- build in a scratch directory of the cache ---------------------------------

started=$SECONDS

# mounted_under DIR: the mount points below DIR, deepest first.
mounted_under() {
    awk -v d="$1/" 'index($5 "/", d) == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
# remove_build DIR: unmount what a build mounted there (debootstrap, us), then
# delete it; never deletes through a mount that would not go.
remove_build() {
    local m
    mounted_under "$1" | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
    if [ -n "$(mounted_under "$1")" ]; then
        say "something is still mounted under $1: not removing it"
    else
        rm -rf "$1"
    fi
}

# Leftovers of a killed build (we hold the lock, so nobody else is building).
for old in "$CACHE"/build.*; do
    [ -d "$old" ] && remove_build "$old"
done
work=$(mktemp -d "$CACHE/build.XXXXXX")
root=$work/root
cleanup() { remove_build "$work"; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

include=$(IFS=,; echo "${PACKAGES[*]}")
say "debootstrap --variant=minbase $SUITE from $MIRROR (+ $include); log: $work/debootstrap.log"
if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$MIRROR" \
        >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (the log's end is above)"
fi
cp "$work/debootstrap.log" "$CACHE/debootstrap.log"

say "configuring: apt (the host's mirror, keep downloaded packages), hostname, fstab"
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
cat >"$root/etc/apt/apt.conf.d/90system-tests" <<'EOF'
// The test image: apt keeps the packages it downloads, so the ones fetched
// when the image was built (tests/installer/system-image.sh) are found there.
APT::Keep-Downloaded-Packages "true";
Acquire::Languages "none";
EOF
# debootstrap copies the host's hostname and hosts files (with their modes).
rm -f "$root/etc/hostname" "$root/etc/hosts"
echo "debian$RELEASE" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	debian$RELEASE
::1		localhost ip6-localhost ip6-loopback
EOF
# The kernel mounts the root read-write (root=/dev/vda rw); no fsck at boot
# on a fresh overlay of a file system made a moment ago.
echo '/dev/vda / ext4 rw,errors=remount-ro 0 0' >"$root/etc/fstab"

say "configuring: systemd-networkd DHCP on the NIC, qemu's DNS, root's SSH key"
cat >"$root/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
in_root systemctl enable systemd-networkd.service >&2
# qemu's user network answers DNS at 10.0.2.3; bookworm's systemd has no
# resolved unless installed, and a static file does not change at runtime.
rm -f "$root/etc/resolv.conf"
echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"
# The tests' apt runs must not race apt's daily jobs for the dpkg lock.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer >&2

# The key outlives rebuilds: systems booted from the previous image (another
# test session's) keep accepting it.
if [ -s "$CACHE/id_ed25519" ] && [ -s "$CACHE/id_ed25519.pub" ]; then
    cp -p "$CACHE/id_ed25519" "$CACHE/id_ed25519.pub" "$work/"
else
    ssh-keygen -q -t ed25519 -N '' -C mitigator-agent-system-tests -f "$work/id_ed25519"
fi
chmod 0600 "$work/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"

say "upgrading from $SUITE-updates and $SUITE-security (a server is kept up to date); log: $work/apt.log"
# apt needs DNS and /proc in the chroot while the image is built; nothing
# started by a package's scripts may run on the build host.
cp "$root/etc/resolv.conf" "$work/resolv.conf.image"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
apt_in_root() {
    in_root apt-get -y -q "$@" >>"$work/apt.log" 2>&1 ||
        { tail -n 30 "$work/apt.log" >&2; die "apt-get $* failed in the image (the log's end is above)"; }
}
apt_in_root update
apt_in_root dist-upgrade

# The kernel comes after the upgrade: the current one, its initramfs made once.
apt_in_root install linux-image-amd64
# The kernel linux-image-amd64 points at; no other (one kernel, one initrd).
kver=$(in_root dpkg-query -W -f='${Depends}' linux-image-amd64 |
    sed -n 's/.*linux-image-\([0-9][^ ,]*-amd64\).*/\1/p')
[ -n "$kver" ] || die "cannot tell which kernel linux-image-amd64 depends on"
old=$(in_root dpkg-query -W -f='${Package}\n' 'linux-image-[0-9]*' | grep -vx "linux-image-$kver" || true)
[ -z "$old" ] || apt_in_root purge $old
[ "$(ls "$root/lib/modules")" = "$kver" ] ||
    die "expected only $kver in the image's /lib/modules, found: $(ls "$root/lib/modules" | tr '\n' ' ')"
[ -f "$root/boot/vmlinuz-$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] ||
    die "the image has no /boot/vmlinuz-$kver or initrd.img-$kver"
[ -s "$root/etc/machine-id" ] || die "the image has no /etc/machine-id"

say "downloading (only) what installing mitigator-agent pulls: ${PREDOWNLOAD[*]} linux-headers-$kver"
# Only those stay in apt's cache, not what debootstrap and the upgrade fetched.
apt_in_root clean
apt_in_root install --download-only "${PREDOWNLOAD[@]}" "linux-headers-$kver"
cp "$work/apt.log" "$CACHE/apt.log"
umount "$root/proc"
cp "$work/resolv.conf.image" "$root/etc/resolv.conf"
debs=$(find "$root/var/cache/apt/archives" -maxdepth 1 -name '*.deb' | wc -l)
for pkg in "${PREDOWNLOAD[@]}" "linux-headers-$kver"; do
    ls "$root/var/cache/apt/archives/${pkg}_"*.deb >/dev/null 2>&1 ||
        in_root dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
        die "$pkg was neither downloaded nor installed"
done
say "$debs packages in the image's apt cache"

# Nothing may be left that only the build needed.
rm -f "$root/usr/sbin/policy-rc.d"
[ -z "$(find "$root/proc" "$root/sys" -mindepth 1 -maxdepth 1 2>/dev/null | head -n 1)" ] ||
    die "$root/proc or /sys is still mounted"

say "mkfs.ext4 -d: a $IMAGE_SIZE sparse raw image"
truncate -s "$IMAGE_SIZE" "$work/$SUITE.raw"
mkfs.ext4 -q -F -L "debian$RELEASE" -d "$root" "$work/$SUITE.raw"
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
echo "$kver" >"$work/kernel-release"

# Into place; the stamp last, so a build killed before it is redone.
rm -f "$CACHE/image.stamp"
for f in "${outputs[@]}"; do mv -f "$work/$f" "$CACHE/$f"; done
echo "$want" >"$CACHE/image.stamp"
say "built $CACHE/$SUITE.raw (kernel $kver, $(du -h --apparent-size "$CACHE/$SUITE.raw" | cut -f1) sparse, $(du -h "$CACHE/$SUITE.raw" | cut -f1) used) in $((SECONDS - started)) s"
