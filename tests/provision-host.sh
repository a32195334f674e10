#!/usr/bin/env bash
# Install what the test suite needs on a Debian 12 host: build tools, qemu,
# OpenSSH client, DKMS, and the image + headers of each guest kernel the
# kernel tests boot. Idempotent: when everything is present it runs no apt.
#
#   tests/provision-host.sh KVER...     e.g. 6.1.0-56-amd64
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "provision-host: needs root (apt-get)" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "provision-host: needs a Debian-like host" >&2; exit 1; }

packages=(
    build-essential kmod dkms openssl
    qemu-system-x86 busybox-static
    openssh-client openssh-sftp-server iproute2 procps util-linux
)
for kver in "$@"; do
    packages+=("linux-image-$kver" "linux-headers-$kver")
done

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "provision-host: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
