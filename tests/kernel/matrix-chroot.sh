#!/usr/bin/env bash
# Debian release chroots and guest kernels for the kernel matrix (issue 7).
#
#   matrix-chroot.sh prepare SUITE          debootstrap SUITE's build chroot
#   matrix-chroot.sh kernel SUITE KVER      headers into the chroot, image for
#                                           the host; prints the KVER provided
#   matrix-chroot.sh newest SUITE           asks SUITE's archive (apt-get update in
#                                           its chroot) for its newest kernel ABI;
#                                           prints "KVER VERSION" and records it in
#                                           $CACHE/newest/SUITE
#   matrix-chroot.sh build SUITE KVER SRC OUT
#                                           DKMS-build SRC (a kmod/ tree) for
#                                           KVER in SUITE's chroot; the signed
#                                           module and the log go to OUT
#   matrix-chroot.sh purge                  remove the cache (a fresh start)
#
# Everything lives under $TCPSECRETS_MATRIX_CACHE (/var/cache/tcpsecrets-matrix),
# outside the repository; a second run finds it there and does no network I/O:
#   chroot/SUITE/     debootstrap --variant=minbase + build-essential, dkms,
#                     openssl, kmod and the linux-headers-KVER of SUITE's kernels
#   kernel/KVER/      the image packages of KVER, extracted (dpkg-deb -x);
#                     vmlinuz: the image. Their modules (depmod run) go to the
#                     host's /lib/modules/KVER, marked as ours, where the
#                     guest's modprobe finds them (virtme-ng boots the host's
#                     filesystem), unless the host has that kernel installed.
# apt in a chroot uses the Debian mirror of the host's own sources
# (/etc/apt/sources.list.d/debian.sources), read here at run time.
# A KVER the suite no longer carries (its ABI moved on at a point release) is
# replaced by the suite's current one, with a warning on stderr. `kernel` asks
# the archive every time (apt-get update: the package lists only) and says, in a
# NOTICE line, when the suite's current kernel is another ABI than the one asked for.
set -euo pipefail

CACHE=${TCPSECRETS_MATRIX_CACHE:-/var/cache/tcpsecrets-matrix}

say() { echo "matrix-chroot: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"

# --- the host's Debian mirror ----------------------------------------------

host_codename() { . /etc/os-release && echo "${VERSION_CODENAME:?}"; }

# uri_for SUITE: the first URI of the host's deb822 stanza listing SUITE.
uri_for() {
    local f=/etc/apt/sources.list.d/debian.sources
    [ -f "$f" ] || return 0
    awk -v want="$1" '
        /^[ \t]*$/ { if (hit && uri != "") { print uri; exit } hit = 0; uri = ""; next }
        /^URIs:/   { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
        END        { if (hit && uri != "") print uri }' "$f" | head -n 1
}

# The main archive and the security archive the host itself uses.
mirror() {
    local m=${TCPSECRETS_MATRIX_MIRROR:-$(uri_for "$(host_codename)")}
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    [ -n "$m" ] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources"
    echo "${m%/}"
}
security_mirror() { local s; s=$(uri_for "$(host_codename)-security"); echo "${s%/}"; }

# --- chroots ------------------------------------------------------------------

# Packages every build chroot gets (a user building a DKMS module has these).
BASE_PACKAGES="build-essential dkms kmod openssl ca-certificates xz-utils"

root_of() { echo "$CACHE/chroot/$1"; }

mounted=()
unmount_all() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" 2>/dev/null || true
    done
    mounted=()
}
trap unmount_all EXIT
trap 'unmount_all; exit 130' INT
trap 'unmount_all; exit 143' TERM

# mount_proc ROOT: /proc in the chroot (7.2's objtool reads /proc/self/maps;
# dpkg and DKMS look at it too), undone by the trap above.
mount_proc() {
    mountpoint -q "$1/proc" && return 0
    mount -t proc proc "$1/proc"
    mounted+=("$1/proc")
}

in_chroot() {
    local root=$1
    shift
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

write_apt_config() {
    local root=$1 suite=$2 m sec
    m=$(mirror)
    sec=$(security_mirror)
    {
        echo "deb $m $suite main"
        case $suite in
            sid|unstable) ;;
            *)
                echo "deb $m $suite-updates main"
                [ -z "$sec" ] || echo "deb $sec $suite-security main"
                ;;
        esac
    } >"$root/etc/apt/sources.list"
    {
        echo 'APT::Install-Recommends "false";'
        echo 'Acquire::Languages "none";'
        echo 'Dpkg::Use-Pty "0";'
        # sid's Release file can be past its Valid-Until on the mirror.
        case $suite in sid|unstable) echo 'Acquire::Check-Valid-Until "false";' ;; esac
    } >"$root/etc/apt/apt.conf.d/99tcpsecrets-matrix"
    # Nothing in a build chroot starts services.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
}

prepare() {
    local suite=$1 root stamp want tmp
    root=$(root_of "$suite")
    stamp=$root/.tcpsecrets-matrix
    want="suite=$suite mirror=$(mirror) packages=$BASE_PACKAGES"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    mkdir -p "$CACHE/chroot"
    if [ -d "$root" ]; then
        # An older chroot (other mirror or package set): rebuild it.
        say "$suite: rebuilding $root"
        safe_rm "$root"
    fi
    tmp=$root.new
    safe_rm "$tmp"
    say "$suite: debootstrap --variant=minbase into $tmp"
    debootstrap --variant=minbase "$suite" "$tmp" "$(mirror)" >"$CACHE/chroot/$suite.debootstrap.log" 2>&1 ||
        { tail -n 30 "$CACHE/chroot/$suite.debootstrap.log" >&2; die "$suite: debootstrap failed"; }
    write_apt_config "$tmp" "$suite"
    mount_proc "$tmp"
    say "$suite: apt-get install $BASE_PACKAGES"
    in_chroot "$tmp" apt-get update -q >&2
    # shellcheck disable=SC2086
    in_chroot "$tmp" apt-get install -y -q $BASE_PACKAGES >&2
    in_chroot "$tmp" apt-get clean
    unmount_all
    echo "$want" >"$tmp/.tcpsecrets-matrix"
    mv "$tmp" "$root"
}

# safe_rm DIR: remove a chroot that might still have something mounted.
safe_rm() {
    [ -e "$1" ] || return 0
    local m
    for m in $(awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
    rm -rf --one-file-system "$1"
}

# --- kernels ------------------------------------------------------------------

apt_updated=
chroot_apt_update() {
    [ -n "$apt_updated" ] && return 0
    say "$2: apt-get update"
    in_chroot "$1" apt-get update -q >&2
    apt_updated=1
}

has_candidate() {
    local policy
    policy=$(in_chroot "$1" apt-cache policy "$2" 2>/dev/null) || return 1
    case $policy in *"Candidate: "[0-9]*) return 0 ;; esac
    return 1
}

# The kernel ABI the suite's linux-image-amd64 points at now.
current_kver() {
    in_chroot "$1" apt-cache depends linux-image-amd64 |
        sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -n 1
}

# find_newest SUITE: ask the suite's archive for its newest kernel ABI (the package lists only;
# a failure to reach the archive is a warning: the cached lists answer). Sets NEWEST_KVER and
# NEWEST_VERSION (the Debian version of linux-image-KVER) and keeps "KVER VERSION" in
# $CACHE/newest/SUITE, where the matrix's results table reads it.
NEWEST_KVER= NEWEST_VERSION=
find_newest() {
    local suite=$1 root
    root=$(root_of "$suite")
    [ -f "$root/.tcpsecrets-matrix" ] || die "$suite: no chroot (run prepare first)"
    if [ -z "$apt_updated" ]; then
        say "$suite: apt-get update (has a newer kernel been published?)"
        if in_chroot "$root" apt-get update -q >&2; then
            apt_updated=1
        else
            say "WARNING: $suite: apt-get update failed; newer kernels are judged from the lists of an earlier run"
        fi
    fi
    NEWEST_KVER=$(current_kver "$root")
    [ -n "$NEWEST_KVER" ] || die "$suite: linux-image-amd64 points at no kernel"
    NEWEST_VERSION=$(package_version "$root" "linux-image-$NEWEST_KVER")
    mkdir -p "$CACHE/newest"
    echo "$NEWEST_KVER $NEWEST_VERSION" >"$CACHE/newest/$suite.new"
    mv "$CACHE/newest/$suite.new" "$CACHE/newest/$suite"
}

# package_version ROOT PACKAGE: the version apt would install (its candidate).
package_version() {
    in_chroot "$1" apt-cache policy "$2" | sed -n 's/^ *Candidate: //p' | head -n 1
}

headers_installed() {
    [ "$(in_chroot "$1" dpkg-query -W -f='${Status}' "linux-headers-$2" 2>/dev/null)" = \
      "install ok installed" ]
}

# resolve ROOT SUITE KVER: sets RESOLVED to KVER if the chroot has it or the
# suite carries it, else to the suite's current kernel (with a warning).
RESOLVED=
resolve() {
    local root=$1 suite=$2 kver=$3 now
    RESOLVED=$kver
    if headers_installed "$root" "$kver" && have_image "$suite" "$kver"; then
        return 0
    fi
    chroot_apt_update "$root" "$suite"
    if has_candidate "$root" "linux-image-$kver" && has_candidate "$root" "linux-headers-$kver"; then
        return 0
    fi
    now=$(current_kver "$root")
    [ -n "$now" ] || die "$suite: linux-image-$kver is not available and no current kernel found"
    say "WARNING: $suite no longer carries linux-image-$kver; testing $now instead" \
        "(update tests/kernel/test-kernels)"
    RESOLVED=$now
}

# have_image SUITE KVER: the host can boot KVER (installed, or extracted here).
have_image() {
    host_installed "$1" "$2" || image_ready "$2"
}

# host_installed SUITE KVER: the host runs SUITE and has KVER from its own apt.
host_installed() {
    [ "$1" = "$(host_codename)" ] && [ -f "/boot/vmlinuz-$2" ] &&
        [ -d "/lib/modules/$2/kernel" ] && [ ! -f "/lib/modules/$2/$MARK" ]
}

# The image packages of KVER: linux-image-KVER, and where the image is split
# (sid: linux-binary-KVER holds vmlinuz, linux-modules-KVER the modules) the
# linux-*-KVER packages it depends on.
image_packages() {
    local root=$1 kver=$2
    echo "linux-image-$kver"
    in_chroot "$root" apt-cache depends "linux-image-$kver" |
        awk -v k="$kver" '$1 == "Depends:" && $2 ~ /^linux-/ && substr($2, length($2) - length(k) + 1) == k { print $2 }'
}

# The marker of a /lib/modules/KVER this script put there.
MARK=.tcpsecrets-matrix

image_ready() {
    [ -f "$CACHE/kernel/$1/.ready" ] && [ -f "/lib/modules/$1/$MARK" ]
}

# extract_image ROOT SUITE KVER: the image packages of KVER, unpacked
# (dpkg-deb -x) with depmod run. The modules go to the host's
# /lib/modules/KVER: virtme-ng gives the guest the host's filesystem (with a
# tmpfs over /var/cache), and the guest's modprobe looks there. Only the
# image stays in $CACHE/kernel/KVER, alone: virtme-ng takes the nearest
# directory above the image that has lib/modules for the kernel's root.
extract_image() {
    local root=$1 suite=$2 kver=$3 dest tmp debs pkgs vmlinuz moddir f deb
    dest=$CACHE/kernel/$kver
    image_ready "$kver" && return 0
    if [ -e "/lib/modules/$kver" ] && [ ! -L "/lib/modules/$kver" ] && [ ! -f "/lib/modules/$kver/$MARK" ]; then
        die "$kver: /lib/modules/$kver exists and is not ours (a kernel package?); not touching it"
    fi
    mkdir -p "$CACHE/kernel"
    tmp=$dest.new
    rm -rf "$tmp"
    debs=$root/var/cache/tcpsecrets-matrix-debs
    rm -rf "$debs"
    mkdir -p "$debs" "$tmp"
    chroot_apt_update "$root" "$suite"
    mapfile -t pkgs < <(image_packages "$root" "$kver")
    say "$suite: downloading ${pkgs[*]}"
    in_chroot "$root" sh -c 'cd /var/cache/tcpsecrets-matrix-debs && chown _apt . 2>/dev/null; apt-get download -q "$@"' \
        sh "${pkgs[@]}" >&2
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$tmp"
    done
    rm -rf "$debs"
    # Merged-/usr packages (trixie, sid) ship usr/lib/modules.
    moddir=
    for f in "$tmp/lib/modules/$kver" "$tmp/usr/lib/modules/$kver"; do
        [ -d "$f/kernel" ] && { moddir=$f; break; }
    done
    [ -n "$moddir" ] || die "$kver: no modules in ${pkgs[*]}"
    vmlinuz=
    for f in "$tmp/boot/vmlinuz-$kver" "$moddir/vmlinuz"; do
        [ -f "$f" ] && { vmlinuz=$f; break; }
    done
    [ -n "$vmlinuz" ] || die "$kver: no vmlinuz in ${pkgs[*]}"
    depmod -b "${moddir%/lib/modules/"$kver"}" "$kver"
    touch "$moddir/$MARK"
    rm -rf "/lib/modules/$kver"
    mv "$moddir" "/lib/modules/$kver"
    rm -rf "$dest"
    mkdir -p "$dest"
    if [ -f "$vmlinuz" ]; then
        mv "$vmlinuz" "$dest/vmlinuz"
    else  # sid: the image sat in the modules directory, moved just above
        cp "/lib/modules/$kver/vmlinuz" "$dest/vmlinuz"
    fi
    rm -rf "$tmp"
    touch "$dest/.ready"
}

# Whether KVER is SUITE's pin in tests/kernel/test-kernels (the kernels `make test` boots).
is_pin() {
    sed -e 's/#.*//' "$(dirname "$0")/test-kernels" | awk -v s="$1" -v k="$2" '$1 == s && $2 == k { f = 1 } END { exit !f }'
}

kernel() {
    local suite=$1 kver=$2 root
    root=$(root_of "$suite")
    [ -f "$root/.tcpsecrets-matrix" ] || die "$suite: no chroot (run prepare first)"
    find_newest "$suite"
    resolve "$root" "$suite" "$kver"
    kver=$RESOLVED
    if [ "$NEWEST_KVER" != "$kver" ]; then
        if is_pin "$suite" "$kver"; then
            say "NOTICE: $suite's current kernel is $NEWEST_KVER ($NEWEST_VERSION), the matrix pins $kver" \
                "(tests/kernel/test-kernels): this run tests $kver; \`make matrix-refresh\` moves the pin"
        else  # an older kernel asked for by name (tests/kernel/test-kernels-long): no news
            say "$suite: testing $kver, older than its current kernel $NEWEST_KVER, as asked"
        fi
    fi
    if ! headers_installed "$root" "$kver"; then
        chroot_apt_update "$root" "$suite"
        say "$suite: apt-get install linux-headers-$kver"
        mount_proc "$root"
        in_chroot "$root" apt-get install -y -q "linux-headers-$kver" >&2
        in_chroot "$root" apt-get clean
        unmount_all
    fi
    if ! host_installed "$suite" "$kver"; then
        extract_image "$root" "$suite" "$kver"
    fi
    echo "$kver"
}

# --- DKMS builds --------------------------------------------------------------

build() {
    local suite=$1 kver=$2 src=$3 out=$4 root version log rc=0 ko cert
    root=$(root_of "$suite")
    headers_installed "$root" "$kver" || die "$suite: linux-headers-$kver not in the chroot (provision first)"
    version=$(cat "$src/VERSION")
    mkdir -p "$out"
    rm -f "$out/tcpsecrets.ko" "$out/build.log" "$out/signing-cert.der"
    log=$out/build.log

    # A fresh copy of the source, as a package would put it in /usr/src.
    rm -rf "$root"/var/lib/dkms/tcpsecrets "$root"/usr/src/tcpsecrets-*
    rm -rf "$root"/lib/modules/"$kver"/updates/dkms/tcpsecrets.ko*
    mkdir -p "$root/usr/src/tcpsecrets-$version"
    tar -C "$src" --exclude='*.o' --exclude='*.ko' --exclude='*.mod' --exclude='*.mod.c' \
        --exclude='.*.cmd' --exclude='*.order' --exclude='*.symvers' --exclude='.tmp_versions' \
        --exclude='compat/generated.h' -cf - . | tar -C "$root/usr/src/tcpsecrets-$version" -xf -

    # Signing on, as DKMS does it in this release: DKMS >= 3 makes its MOK
    # key pair (/var/lib/dkms/mok.key, mok.pub) and signs by itself; DKMS 2.8
    # needs the user to switch it on (enable_dkms2_signing).
    if ! grep -q 'mok_signing_key' "$root/usr/sbin/dkms"; then
        enable_dkms2_signing "$root"
    fi

    mount_proc "$root"
    {
        echo "# DKMS build of tcpsecrets $version for $kver in a $suite chroot"
        echo "# linux-headers-$kver $(in_chroot "$root" dpkg-query -W -f='${Version}' "linux-headers-$kver")"
        echo "# dkms $(in_chroot "$root" dpkg-query -W -f='${Version}' dkms)," \
             "$(in_chroot "$root" sh -c 'cc=$(sed -n "s/^CONFIG_CC_VERSION_TEXT=\"\(.*\)\"$/\1/p" /usr/src/linux-headers-$1/.config); echo "${cc:-unknown compiler}"' sh "$kver")"
        echo "# probed: $(in_chroot "$root" sh "/usr/src/tcpsecrets-$version/compat/probe.sh" \
            "/lib/modules/$kver/source" "/lib/modules/$kver/build" | tr '\n' ' ')"
        for step in "add -m tcpsecrets -v $version" \
                    "build -m tcpsecrets -v $version -k $kver" \
                    "install -m tcpsecrets -v $version -k $kver" \
                    "status -m tcpsecrets"; do
            echo "\$ dkms $step"
            # shellcheck disable=SC2086
            in_chroot "$root" dkms $step 2>&1 || { rc=$?; echo "# dkms $step: exit $rc"; break; }
        done
    } >"$log" 2>&1 || true
    # The compiler's own output: kept by DKMS with the built module, or left
    # in the build directory when the build failed.
    local makelog
    for makelog in "$root/var/lib/dkms/tcpsecrets/$version/$kver/x86_64/log/make.log" \
                   "$root/var/lib/dkms/tcpsecrets/$version/build/make.log"; do
        [ -f "$makelog" ] && { echo "# ${makelog#"$root"}:"; cat "$makelog"; break; }
    done >>"$log"
    unmount_all
    ko=$(ls "$root/var/lib/dkms/tcpsecrets/$version/$kver/x86_64/module/"tcpsecrets.ko* 2>/dev/null | head -n 1 || true)
    if [ "$rc" = 0 ] && [ -n "$ko" ]; then
        case $ko in
            *.ko) cp "$ko" "$out/tcpsecrets.ko" ;;
            *.ko.xz) xz -dc "$ko" >"$out/tcpsecrets.ko" ;;
            *.ko.zst) zstd -qdc "$ko" >"$out/tcpsecrets.ko" ;;
            *.ko.gz) gzip -dc "$ko" >"$out/tcpsecrets.ko" ;;
            *) die "unknown module file $ko" ;;
        esac
        cert=$(signing_cert "$root") && cp "$cert" "$out/signing-cert.der"
        say "$suite: built $out/tcpsecrets.ko for $kver"
        return 0
    fi
    say "$suite: DKMS build for $kver FAILED (log: $log)"
    return 1
}

# DKMS 2.8 (bullseye) signs through sign_tool, which Debian ships commented
# out, with a helper (/etc/dkms/sign_helper.sh) that signs with the key pair
# /root/mok.priv + /root/mok.der: the user makes that pair (the Debian wiki's
# SecureBoot page: openssl req ... -outform DER) and uncomments sign_tool.
enable_dkms2_signing() {
    local root=$1
    if [ ! -f "$root/root/mok.priv" ]; then
        in_chroot "$root" openssl req -new -x509 -newkey rsa:2048 -nodes -days 36500 -outform DER \
            -keyout /root/mok.priv -out /root/mok.der -subj "/CN=bullseye DKMS sign_tool MOK/" \
            >/dev/null 2>&1
        chmod 600 "$root/root/mok.priv"
    fi
    sed -i 's|^# *sign_tool=|sign_tool=|' "$root/etc/dkms/framework.conf"
    grep -q '^sign_tool=' "$root/etc/dkms/framework.conf" || die "could not enable DKMS's sign_tool"
}

# The certificate DKMS signed with in ROOT.
signing_cert() {
    local f
    for f in "$1/var/lib/dkms/mok.pub" "$1/root/mok.der"; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

# Remove the whole cache and the /lib/modules links into it.
purge() {
    local link
    case $CACHE in /?*) ;; *) die "refusing to purge TCPSECRETS_MATRIX_CACHE=$CACHE" ;; esac
    for link in /lib/modules/*; do
        if [ -L "$link" ]; then
            case $(readlink "$link") in "$CACHE"/*) rm -f "$link" ;; esac
        elif [ -f "$link/$MARK" ]; then
            rm -rf "$link"
        fi
    done
    safe_rm "$CACHE"
}

case ${1:-} in
    prepare) [ $# = 2 ] || die "usage: $0 prepare SUITE"; prepare "$2" ;;
    kernel)  [ $# = 3 ] || die "usage: $0 kernel SUITE KVER"; kernel "$2" "$3" ;;
    newest)  [ $# = 2 ] || die "usage: $0 newest SUITE"; find_newest "$2"; echo "$NEWEST_KVER $NEWEST_VERSION" ;;
    build)   [ $# = 5 ] || die "usage: $0 build SUITE KVER SRC OUT"; build "$2" "$3" "$4" "$5" ;;
    mirror)  mirror ;;
    purge)   purge ;;
    *) die "usage: $0 prepare|kernel|newest|build|purge ..." ;;
esac
