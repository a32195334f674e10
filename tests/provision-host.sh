#!/usr/bin/env bash
# Install what the test suite needs on a Debian 12 host, and provision the
# kernel matrix: for each kernel, a debootstrap chroot of its Debian release
# with the kernel's headers (the module is built there with DKMS, as a user of
# that release builds it) and the kernel image + modules where virtme-ng can
# boot them. Idempotent and quick when everything is there (no installs, no
# downloads but each release's package lists, which say whether its current
# kernel has moved on since its pin: a NOTICE line); the chroots and images
# are cached outside the repository, in
# $TCPSECRETS_MATRIX_CACHE (default /var/cache/tcpsecrets-matrix). Also builds
# the Debian 12 system image of the installer's system tests
# (tests/installer/system-image.sh; cached in /var/cache/mitigator-agent-tests),
# and the images of the suites in $SYSTEM_IMAGE_SUITES (default: bookworm only).
#
#   tests/provision-host.sh [--list FILE] [SUITE:KVER | KVER ...]
#
# No argument: every kernel of tests/kernel/test-kernels (or of FILE, a list
# in the same form: `make test-long` names tests/kernel/test-kernels-long).
# A bare KVER takes its suite from that file, else the host's own release.
#
# Prints the kernel versions to test on stdout (everything else goes to
# stderr). A kernel whose ABI has left its release's archive (a point release
# moved it on) is replaced by the release's current one, with a warning: the
# tests then prove the kernel users of that release run today. A pin that is
# still in the archive is tested as it is, newer kernels or not (`make
# matrix-refresh` moves the pins; tests/kernel/test-kernels says why).
#
# The host's own release (bookworm) gets its kernels from the host's apt, as
# packages (the host-side kbuild and DKMS tests use their headers); the other
# releases' images are extracted from their packages (tests/kernel/matrix-chroot.sh).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LIST=$HERE/kernel/test-kernels
CHROOT_TOOL=$HERE/kernel/matrix-chroot.sh
CACHE=${TCPSECRETS_MATRIX_CACHE:-/var/cache/tcpsecrets-matrix}
export TCPSECRETS_MATRIX_CACHE=$CACHE

say() { echo "provision-host: $*" >&2; }

if [ "${1:-}" = --list ]; then
    [ $# -ge 2 ] && [ -f "$2" ] || { say "--list needs a kernel list file (got '${2:-}')"; exit 1; }
    LIST=$2
    shift 2
fi

[ "$(id -u)" = 0 ] || { say "needs root (apt-get, debootstrap, chroot)"; exit 1; }
command -v apt-get >/dev/null || { say "needs a Debian-like host"; exit 1; }

host_suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

# --- which kernels ------------------------------------------------------------

listed() { sed -e 's/#.*//' "$LIST" | awk 'NF == 2 { print $1 ":" $2 }'; }

kernels=()
if [ $# -eq 0 ]; then
    mapfile -t kernels < <(listed)
else
    for arg in "$@"; do
        case $arg in
            *:*) kernels+=("$arg") ;;
            *)
                suite=$(listed | awk -F: -v k="$arg" '$2 == k { print $1; exit }')
                kernels+=("${suite:-$host_suite}:$arg")
                ;;
        esac
    done
fi
[ ${#kernels[@]} -gt 0 ] || { say "no kernels listed in $LIST"; exit 1; }

# --- the host's packages and its own release's kernels -------------------------

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

apt_updated=
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        say "apt-get update"
        apt-get update -q >&2
        apt_updated=1
    fi
}

available() {
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
    case $policy in *"Candidate: "[0-9]*) return 0 ;; esac
    return 1
}

# The kernel ABI the host release's linux-image-amd64 points at right now.
current_kver() {
    apt_update_once
    apt-cache depends linux-image-amd64 |
        sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -n 1
}

packages=(
    build-essential kmod dkms openssl xz-utils
    qemu-system-x86 qemu-utils busybox-static
    openssh-client dropbear-bin putty-tools iproute2 procps util-linux
    golang-go golang-golang-x-crypto-dev
    debootstrap debian-archive-keyring binutils e2fsprogs
)
# The Debian packages' build dependencies (make deb, tests/packaging).
mapfile -t -O "${#packages[@]}" packages < <(sed -e 's/#.*//' "$HERE/../packaging/build-deps" | awk 'NF { print $1 }')
for i in "${!kernels[@]}"; do
    suite=${kernels[$i]%%:*} kver=${kernels[$i]#*:}
    [ "$suite" = "$host_suite" ] || continue
    if ! installed "linux-image-$kver"; then
        apt_update_once
        if ! available "linux-image-$kver"; then
            now=$(current_kver)
            [ -n "$now" ] || { say "linux-image-$kver is not available and no current kernel found"; exit 1; }
            say "WARNING: linux-image-$kver is no longer in the archive; testing $now instead"
            kver=$now
            kernels[$i]=$suite:$kver
        fi
    fi
    packages+=("linux-image-$kver" "linux-headers-$kver")
done

missing=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_update_once
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# --- the matrix: one chroot per release, its kernels' headers and images ------
# Releases are provisioned in parallel (debootstrap and apt mostly wait on the
# network and on dpkg); each one's output goes to $CACHE/logs/SUITE.log.

mkdir -p "$CACHE/logs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

suites=()
for k in "${kernels[@]}"; do
    suite=${k%%:*}
    [[ " ${suites[*]} " == *" $suite "* ]] || suites+=("$suite")
done

provision_suite() {
    local suite=$1 k kver
    "$CHROOT_TOOL" prepare "$suite"
    for k in "${kernels[@]}"; do
        [ "${k%%:*}" = "$suite" ] || continue
        kver=$("$CHROOT_TOOL" kernel "$suite" "${k#*:}")
        echo "$k $kver" >>"$work/$suite.resolved"
    done
}

pids=()
for suite in "${suites[@]}"; do
    provision_suite "$suite" >"$CACHE/logs/$suite.log" 2>&1 &
    pids+=($!)
done
# The Debian 12 system image the installer's system tests boot, built meanwhile (its own
# debootstrap, in its own cache; a few minutes on a fresh machine, nothing when it is current),
# and the other releases' of $SYSTEM_IMAGE_SUITES (`make test-long`: the release upgrades').
image_suites=(${SYSTEM_IMAGE_SUITES:-bookworm})
image_pids=()
for image_suite in "${image_suites[@]}"; do
    "$HERE/installer/system-image.sh" "$image_suite" >"$CACHE/logs/system-image-$image_suite.log" 2>&1 &
    image_pids+=($!)
done
failed=0
for i in "${!suites[@]}"; do
    if ! wait "${pids[$i]}"; then
        say "${suites[$i]}: provisioning FAILED; the end of $CACHE/logs/${suites[$i]}.log:"
        tail -n 40 "$CACHE/logs/${suites[$i]}.log" >&2
        failed=1
    fi
    # Warnings (a kernel replaced by its release's current one) and notices (a release whose
    # current kernel is newer than its pin) are worth seeing.
    grep -h 'WARNING\|NOTICE' "$CACHE/logs/${suites[$i]}.log" >&2 || true
done
for i in "${!image_suites[@]}"; do
    if ! wait "${image_pids[$i]}"; then
        say "building the ${image_suites[$i]} system image FAILED; the end of $CACHE/logs/system-image-${image_suites[$i]}.log:"
        tail -n 40 "$CACHE/logs/system-image-${image_suites[$i]}.log" >&2
        failed=1
    fi
done
[ "$failed" = 0 ] || exit 1

kvers=()
for k in "${kernels[@]}"; do
    kver=$(awk -v k="$k" '$1 == k { print $2 }' "$work/${k%%:*}.resolved" | head -n 1)
    [ -n "$kver" ] || { say "$k: not provisioned"; exit 1; }
    say "${k%%:*} $kver ($(chroot "$CACHE/chroot/${k%%:*}" dpkg-query -W -f='${Version}' "linux-headers-$kver")): ready"
    kvers+=("$kver")
done
echo "${kvers[*]}"
