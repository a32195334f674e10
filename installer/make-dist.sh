#!/bin/sh
# Build dist/mitigator-agent: installer/mitigator-agent.sh with its payload (module source, systemd and
# system files, the agent's wheel and, for each supported CPython, the wheels agent/requirements.lock
# pins, with the lock the install script installs them by), and its sha256.
# Wheels come from PyPI once and are cached in $WHEEL_CACHE; later builds work offline. Each wheel is
# checked against the lock's hashes, from PyPI and from the cache alike.
#   VERSION=0.1.1 OUT=/tmp/x installer/make-dist.sh   builds another version (upgrade tests) elsewhere
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEEL_CACHE=${WHEEL_CACHE:-/var/cache/mitigator-agent-build/wheels}
# Each supported release's python3 (packaging/pythons).
PYTHON_VERSIONS=$(sed -e 's/#.*//' packaging/pythons | awk 'NF { printf "%s ", $1 }')
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
VERSION=${VERSION:-$(cat kmod/VERSION)}
OUT=${OUT:-dist/mitigator-agent}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
payload=$work/payload
mkdir -p "$payload/wheels" "$payload/installer" "$payload/packaging" "$WHEEL_CACHE"

echo "[#] module source (git ls-files kmod)"
git ls-files -z kmod | xargs -0 -I{} cp --parents {} "$payload/"
printf '%s\n' "$VERSION" >"$payload/kmod/VERSION"
echo "[#] packaging/systemd, packaging/system, installer/mitigator-agent.sh"
cp -R packaging/systemd packaging/system "$payload/packaging/"
cp installer/mitigator-agent.sh "$payload/installer/"

echo "[#] the agent's wheel ($VERSION)"
mkdir -p "$work/tree/kmod"
git ls-files -z agent pyproject.toml README.md | xargs -0 -I{} cp --parents {} "$work/tree/"
printf '%s\n' "$VERSION" >"$work/tree/kmod/VERSION"
# Built by the venv's setuptools (tests/requirements.lock), not one fetched for the build.
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$work/agent" "$work/tree" >"$work/wheel.log" 2>&1 ||
	{ cat "$work/wheel.log" >&2; exit 1; }
agent_wheel=$(ls "$work"/agent/mitigator_agent-"$VERSION"-*.whl)
cp "$agent_wheel" "$payload/wheels/"

# The lock's wheels for each CPython: pip downloads for another Python than its own but judges the
# lock's markers against its own, so each Python gets the lock's entries for it (lockfile.py select).
# One builder at a time fills the cache (make deb shares it): pip writes a wheel in place, and a
# builder reading it half-written would take it for a wheel that does not match the lock.
exec 9>"$WHEEL_CACHE.lock"
flock 9
for pyver in $PYTHON_VERSIONS; do
	abi=cp$(echo "$pyver" | cut -d. -f1,2 | tr -d .)
	"$PYTHON" packaging/lockfile.py select agent/requirements.lock --python "$pyver" >"$work/lock-$pyver.txt"
	# shellcheck disable=SC2086
	set -- --no-deps --require-hashes -r "$work/lock-$pyver.txt" --only-binary=:all: $PLATFORMS \
		--python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none
	if ! "$PYTHON" -m pip download -q --no-index --find-links "$WHEEL_CACHE" -d "$payload/wheels" "$@" 2>/dev/null; then
		echo "[#] wheels for CPython $pyver from PyPI (cached in $WHEEL_CACHE)"
		"$PYTHON" -m pip download -q -d "$WHEEL_CACHE" "$@"
		"$PYTHON" -m pip download -q --no-index --find-links "$WHEEL_CACHE" -d "$payload/wheels" "$@"
	fi
done
flock -u 9
# What the install script installs, each file checked by hash: the lock, and the agent's own wheel.
{
	cat agent/requirements.lock
	printf 'mitigator-agent==%s \\\n    --hash=sha256:%s\n' "$VERSION" "$(sha256sum "$agent_wheel" | cut -d' ' -f1)"
} >"$payload/requirements.lock"

echo "[#] $OUT"
mkdir -p "$(dirname "$OUT")"
tar -C "$payload" --owner=0 --group=0 --numeric-owner --sort=name -czf "$work/payload.tar.gz" .
{
	sed -n '1,/^# @PAYLOAD@$/p' installer/mitigator-agent.sh | sed '$d'
	echo "# The payload: a gzipped tar, base64 (made by installer/make-dist.sh from $VERSION)."
	echo "payload_archive() {"
	echo "	cat <<'MITIGATOR_AGENT_PAYLOAD'"
	base64 -w 76 "$work/payload.tar.gz"
	echo "MITIGATOR_AGENT_PAYLOAD"
	echo "}"
	echo
	sed -n '/^# @PAYLOAD@$/,$p' installer/mitigator-agent.sh | sed '1d'
} >"$OUT.new"
chmod 0755 "$OUT.new"
mv "$OUT.new" "$OUT"
(cd "$(dirname "$OUT")" && sha256sum "$(basename "$OUT")" >"$(basename "$OUT").sha256")
echo "[i] $OUT: $(du -h "$OUT" | cut -f1), $(ls "$payload/wheels" | wc -l) wheels; sha256 in $OUT.sha256"
