#!/usr/bin/env bash
# Install what the test suite needs on a Debian 12 host: build tools, qemu,
# DKMS, the OpenSSH client, and the image + headers of each guest kernel the
# kernel tests boot. Idempotent: when everything is present it runs no apt.
#
#   tests/provision-host.sh [KVER...]     e.g. 6.1.0-56-amd64
#
# Prints the kernel versions to test on stdout (everything else goes to
# stderr). A requested kernel that Debian no longer carries (its ABI moved on
# at a point release) is replaced by bookworm's current one, with a warning:
# the tests then prove the kernel our users run today. No KVER: that one.
set -euo pipefail

say() { echo "provision-host: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (apt-get)"; exit 1; }
command -v apt-get >/dev/null || { say "needs a Debian-like host"; exit 1; }

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
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'
}

# The kernel ABI bookworm's linux-image-amd64 points at right now.
current_kver() {
    apt_update_once
    apt-cache depends linux-image-amd64 |
        sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -n 1
}

kvers=()
for kver in "$@"; do
    if ! installed "linux-image-$kver"; then
        apt_update_once
        if ! available "linux-image-$kver"; then
            now=$(current_kver)
            [ -n "$now" ] || { say "linux-image-$kver is not available and no current kernel found"; exit 1; }
            say "WARNING: linux-image-$kver is no longer in the archive; testing $now instead"
            kver=$now
        fi
    fi
    kvers+=("$kver")
done
[ $# -gt 0 ] || kvers=("$(current_kver)")

packages=(
    build-essential kmod dkms openssl
    qemu-system-x86 busybox-static
    openssh-client iproute2 procps util-linux
)
for kver in "${kvers[@]}"; do
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

echo "${kvers[*]}"
