#!/bin/sh
# Build dist/mitigator-agent: installer/mitigator-agent.sh with its payload, the two Debian packages
# of this tree (tcpsecrets-dkms, mitigator-agent; built by packaging/build-deb.sh, which caches the
# wheels the lock pins in /var/cache/mitigator-agent-build), and its sha256.
#   VERSION=0.1.1 OUT=/tmp/x installer/make-dist.sh   builds another version (upgrade tests) elsewhere
set -eu
cd "$(dirname "$0")/.."
VERSION=${VERSION:-$(cat kmod/VERSION)}
OUT=${OUT:-dist/mitigator-agent}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
payload=$work/payload
mkdir -p "$payload"

echo "[#] the packages of $VERSION (packaging/build-deb.sh; lintian is make deb's)"
DEB_DIST_DIR=$work/debs DEB_BUILD_DIR=$work/build DEB_LINTIAN=no packaging/build-deb.sh "$VERSION" 2>"$work/deb.log" ||
	{ cat "$work/deb.log" >&2; exit 1; }
# Fixed names inside the payload: the script installs whatever version they carry.
cp "$work/debs/tcpsecrets-dkms_${VERSION}-1_all.deb" "$payload/tcpsecrets-dkms.deb"
cp "$work/debs/mitigator-agent_${VERSION}-1_amd64.deb" "$payload/mitigator-agent.deb"

echo "[#] $OUT"
mkdir -p "$(dirname "$OUT")"
tar -C "$payload" --owner=0 --group=0 --numeric-owner --sort=name -czf "$work/payload.tar.gz" .
{
	sed -n '1,/^# @PAYLOAD@$/p' installer/mitigator-agent.sh | sed '$d'
	echo "# The payload: a gzipped tar of the two .debs, base64 (made by installer/make-dist.sh from $VERSION)."
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
echo "[i] $OUT: $(du -h "$OUT" | cut -f1) ($VERSION); sha256 in $OUT.sha256"
