#!/usr/bin/env bash
# `make deb`: build the tcpsecrets-dkms and mitigator-agent packages into
# dist/ and check them with lintian.
#
#   packaging/build-deb.sh [VERSION]
#
# VERSION defaults to kmod/VERSION, the project's only version source; another
# one (a higher version for upgrade tests) is written into the staged copy,
# never into the tree. The Debian revision is always -1 and debian/changelog
# is generated from debian/changelog.in, so no second copy of the version can
# drift.
#
# On a fresh Debian 12 amd64 host (as root) this installs the build
# dependencies listed in packaging/build-deps (apt, only the missing ones) and
# downloads the wheels the locks pin (agent/requirements.lock for the agent,
# tests/requirements.lock for the build backend, setuptools), each checked by
# hash, from PyPI into $MITIGATOR_BUILD_CACHE (default
# /var/cache/mitigator-agent-build, or ~/.cache/mitigator-agent-build when not
# root: outside the repository). Repeat builds use the cached wheels and need
# no network. Other versions come only with other locks (`make lock`).
#
# DEB_DIST_DIR (default dist/) and DEB_BUILD_DIR (default build/deb, emptied
# first) move the output and the staging area (the tests build in a temporary
# directory); DEB_LINTIAN=no leaves lintian to the caller.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" = 0 ]; then
    CACHE=${MITIGATOR_BUILD_CACHE:-/var/cache/mitigator-agent-build}
else
    CACHE=${MITIGATOR_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mitigator-agent-build}
fi
DIST=${DEB_DIST_DIR:-$ROOT/dist}
STAGE_ROOT=${DEB_BUILD_DIR:-$ROOT/build/deb}
# The build's interpreter (pip, the man page); never a python3 that happens to
# come first on PATH. The package runs on each python3 of packaging/pythons.
PY=/usr/bin/python3
PYTHONS=$(sed -e 's/#.*//' "$ROOT/packaging/pythons" | awk 'NF { print $1 }')

say() { echo "build-deb: $*" >&2; }
die() { say "$*"; exit 1; }

VERSION=${1:-$(cat "$ROOT/kmod/VERSION")}
[[ $VERSION =~ ^[0-9]+(\.[0-9]+){1,3}$ ]] ||
    die "version '$VERSION' is not N.N[.N[.N]] (kmod/VERSION or VERSION=...)"

# --- the host ------------------------------------------------------------------

command -v dpkg >/dev/null || die "needs a Debian host (dpkg not found)"
arch=$(dpkg --print-architecture)
[ "$arch" = amd64 ] || die "builds amd64 packages only; this host is $arch"
host_python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
    die "$PY not found: apt-get install python3"
# The build imports the tree it lays out (the man page): its python3 must be one the tree serves.
echo "$PYTHONS" | cut -d. -f1,2 | grep -qx "$host_python" ||
    die "$PY is $host_python; the package serves Python $(echo "$PYTHONS" | cut -d. -f1,2 | tr '\n' ' ')(packaging/pythons): build on one of those releases"

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
while read -r pkg; do
    installed "$pkg" || missing+=("$pkg")
done < <(sed -e 's/#.*//' "$ROOT/packaging/build-deps" | awk 'NF { print $1 }')
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing build dependencies: ${missing[*]} (run as root, or apt-get install them)"
    say "installing ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# --- a staged copy of the tree ----------------------------------------------------
# Tracked and untracked-but-not-ignored files only: no build output, venv or
# bytecode of the working tree reaches the package.

stage=$STAGE_ROOT/mitigator-agent-$VERSION
rm -rf "$STAGE_ROOT"
mkdir -p "$stage"
(
    cd "$ROOT"
    git ls-files -z --cached --others --exclude-standard -- \
        kmod agent pyproject.toml README.md packaging/debian packaging/system packaging/systemd \
        packaging/pythons packaging/site-tree.py installer/mitigator-agent.sh |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -
) | tar -xf - -C "$stage"
mv "$stage/packaging/debian" "$stage/debian"
echo "$VERSION" >"$stage/kmod/VERSION"

# The changelog's date is the last commit's: the same tree builds the same packages.
epoch=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)
sed -e "s/@VERSION@/$VERSION/" -e "s/@DATE@/$(LC_ALL=C date -u -R -d "@$epoch")/" \
    "$stage/debian/changelog.in" >"$stage/debian/changelog"
rm "$stage/debian/changelog.in"

# --- wheels: the cache first, PyPI when something is missing --------------------

# The agent's runtime wheels, for each Python the package serves (packaging/pythons): the lock's
# entries for that Python (lockfile.py select: pip judges markers against its own Python only),
# downloaded for its ABI into $stage/wheels/runtime/X.Y; packaging/site-tree.py lays them out.
for python in $PYTHONS; do
    "$PY" "$ROOT/packaging/lockfile.py" select "$ROOT/agent/requirements.lock" --python "$python" \
        >"$STAGE_ROOT/runtime-$python.txt"
done
# setuptools builds the agent's wheel (pyproject's build-system) offline: the pin of the test lock.
"$PY" "$ROOT/packaging/lockfile.py" select "$ROOT/tests/requirements.lock" \
    --python "$("$PY" -c 'import platform; print(platform.python_version())')" --only setuptools \
    >"$STAGE_ROOT/build.txt"

# pip_download LIST DIR [PYTHON]: the wheels $STAGE_ROOT/LIST.txt pins, checked by hash, into DIR,
# for CPython PYTHON (default: the build's own); from the cache, or from PyPI into the cache.
pip_download() {
    local list=$1 into=$2 python=${3:-} cached=$CACHE/wheels target=()
    if [ -n "$python" ]; then
        local abi
        abi=cp$(echo "$python" | cut -d. -f1,2 | tr -d .)
        target=(--python-version "$python" --implementation cp --abi "$abi" --abi abi3 --abi none
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    fi
    local args=(-m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps
                --require-hashes -r "$STAGE_ROOT/$list.txt" "${target[@]}")
    mkdir -p "$cached"
    if "$PY" "${args[@]}" -d "$into" --no-index --find-links "$cached" 2>/dev/null; then
        return 0
    fi
    say "downloading the $list wheels from PyPI into $cached"
    "$PY" "${args[@]}" -d "$cached" >&2
    rm -rf "$into"
    "$PY" "${args[@]}" -d "$into" --no-index --find-links "$cached" >&2
}
# One builder at a time fills the cache (make dist shares it): pip writes a wheel in place, and a
# builder reading it half-written would take it for a wheel that does not match the lock.
mkdir -p "$CACHE"
exec 9>"$CACHE/wheels.lock"
flock 9
for python in $PYTHONS; do
    pip_download "runtime-$python" "$stage/wheels/runtime/$(echo "$python" | cut -d. -f1,2)" "$python"
done
pip_download build "$stage/wheels/build"
flock -u 9
"$PY" "$ROOT/packaging/site-tree.py" plan "$stage/wheels/runtime" | sed 's/^/build-deb: /' >&2

# --- build --------------------------------------------------------------------------

say "building mitigator-agent $VERSION-1 (log: $STAGE_ROOT/build.log)"
if ! (cd "$stage" && dpkg-buildpackage -b -us -uc) >"$STAGE_ROOT/build.log" 2>&1; then
    tail -n 40 "$STAGE_ROOT/build.log" >&2
    die "dpkg-buildpackage failed; the whole log: $STAGE_ROOT/build.log"
fi
mkdir -p "$DIST"
debs=("tcpsecrets-dkms_${VERSION}-1_all.deb" "mitigator-agent_${VERSION}-1_amd64.deb")
for deb in "${debs[@]}"; do
    cp "$STAGE_ROOT/$deb" "$DIST/"
    say "$DIST/$deb ($(stat -c %s "$DIST/$deb") bytes)"
done

# --- lintian: no errors, no warnings that are not overridden with a reason ----------

if [ "${DEB_LINTIAN:-yes}" != no ]; then
    (cd "$DIST" && lintian --fail-on error,warning --display-info "${debs[@]}")
    say "lintian: no errors, no warnings"
fi
