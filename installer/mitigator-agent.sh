#!/bin/sh
# mitigator-agent install script: installs, updates (run it again) and removes (-d) the tcpsecrets
# kernel module and the mitigator-agent service on a Debian or Ubuntu server, as the two Debian
# packages it carries (tcpsecrets-dkms, mitigator-agent): apt installs them with what they need
# from the server's own mirror (dkms, the kernel's headers, python3), and their maintainer scripts
# set the server up. The script adds what apt cannot: refusing an unsuitable kernel in one line,
# checking that the module builds before an update touches anything, rolling back, a transcript,
# and moving a server installed by an older script (a venv, units in /etc) to the packages.
#
#   wget -O- https://example.org/mitigator-agent | sh      install or update (as root)
#   sh mitigator-agent -d [--purge [--yes]]                 uninstall (--purge: keys, host key, user too;
#                                                           at a terminal it asks first unless --yes)
#
# `make dist` appends the payload (the two .debs) to this file as dist/mitigator-agent; the copy the
# package installs (/usr/lib/mitigator-agent/install.sh, which `mitigator-agent -d` runs) carries
# none and only uninstalls. Everything is in functions and the last line calls main: a download cut
# short runs nothing.
#
# Test hooks (the system tests use them; an admin never needs to): MITIGATOR_AGENT_KERNEL (kernel release
# to check instead of `uname -r`), MITIGATOR_AGENT_KCONFIG (its config file), MITIGATOR_AGENT_STEP_PAUSE
# (a step name: the install stops there for a while, so a test can kill it at that step).

PROG=mitigator-agent
PACKAGES="tcpsecrets-dkms mitigator-agent"
LIB_DIR=/usr/lib/mitigator-agent
LAUNCHER=$LIB_DIR/mitigator-agent
HOME_DIR=/opt/mitigator_agent
KEYS_FILE=$HOME_DIR/keys
HOST_KEY=$HOME_DIR/host.ed25519
# The script's own records (the package's state is /var/lib/mitigator-agent, which its purge removes):
# the packages apt added for this install (removed again by -d), and the .debs of the installed
# version (a failed update reinstalls them).
STATE_DIR=/var/lib/mitigator-agent-install
APT_BEFORE=$STATE_DIR/packages-before-apt
APT_ADDED=$STATE_DIR/apt-installed
KEPT_DEBS=$STATE_DIR/debs
LOG_FILE=/var/log/mitigator-agent-install.log
SERVICE_USER=mitigator_agent
MODULE=tcpsecrets
PORT=7100
OLDEST_KERNEL=5.10      # the oldest kernel the project's tests boot
DKMS_MOK=/var/lib/dkms/mok.pub
# An install by a script from before the packages: its version file, and what it put where the
# packages now put their own (moved aside into $LEGACY before apt, dropped once the packages serve).
LEGACY_STATE=/var/lib/mitigator-agent
LEGACY_VERSION=$LEGACY_STATE/version
LEGACY=$STATE_DIR/legacy
LEGACY_FILES="/etc/systemd/system/mitigator-agent.service /etc/systemd/system/mitigator-agent.socket
/etc/kernel/postinst.d/zz-tcpsecrets /etc/kernel/header_postinst.d/zz-tcpsecrets
/etc/modprobe.d/tcpsecrets.conf /etc/modules-load.d/tcpsecrets.conf /etc/sysctl.d/90-tcpsecrets.conf $LIB_DIR/install.sh $LAUNCHER
/usr/local/sbin/mitigator-agent /usr/local/share/man/man8/mitigator-agent.8
/usr/local/share/bash-completion/completions/mitigator-agent"

# --- output ----------------------------------------------------------------------------------

# To the terminal as is; to the log with the time, so the log shows how long each step took.
say() { printf '%s\n' "$*" >&2; [ -w "$LOG_FILE" ] && printf '%s %s\n' "$(date +%T)" "$*" >>"$LOG_FILE"; return 0; }

# Stop with one line saying what to do. With a rollback armed, that line comes after the rollback's.
die() {
	FAIL_MESSAGE="$PROG: $*"
	[ "${ROLLBACK_ARMED:-no}" = yes ] || say "$FAIL_MESSAGE"
	exit 1
}

# Echo a command (like wg-quick), run it with its output in the log; on failure show the log's tail.
cmd() {
	say "[#] $*"
	if [ -w "$LOG_FILE" ]; then
		logged=$(wc -c <"$LOG_FILE")
		"$@" >>"$LOG_FILE" 2>&1 && return 0
		cmd_status=$?
		# The end of what this command wrote (not earlier runs' lines).
		tail -c +$((logged + 1)) "$LOG_FILE" | tail -n 15 | sed 's/^/    /' >&2
		return $cmd_status
	fi
	"$@"
}

pause_at() {
	[ "${MITIGATOR_AGENT_STEP_PAUSE:-}" = "$1" ] || return 0
	say "[test hook] pausing at step $1"
	sleep 600
}

usage() {
	cat <<USAGE
Usage: sh $PROG [-d [--purge [--yes]]] [-h]

  (no option)  install, or update an existing install (keys and host key are kept)
  -d           uninstall: the packages $PACKAGES and what apt added for them;
               keeps $KEYS_FILE and the host key ($HOST_KEY)
  -d --purge   uninstall and also remove the keys, the host key and the $SERVICE_USER user;
               at a terminal it asks first (the host key MITIGATOR pins is gone for good)
  --yes        with -d --purge: do not ask (scripts)
  -h           this help

Runs as root on Debian 11/12/13 or Ubuntu 22.04/24.04 (x86_64). Log: $LOG_FILE
USAGE
}

# --- facts -----------------------------------------------------------------------------------

package_status() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null; }

is_installed_pkg() { [ "$(package_status "$1")" = installed ]; }

# The version of an installed package; empty when it is not installed.
installed_version() {
	is_installed_pkg "$1" && dpkg-query -W -f='${Version}' "$1" | sed 's/-[^-]*$//'
}

# Packages on the system in any state but gone (a run killed inside dpkg leaves some half-configured).
present_packages() {
	dpkg-query -W -f='${db:Status-Status} ${Package}\n' 2>/dev/null |
		awk '$1 != "not-installed" && $1 != "config-files" { print $2 }' | sort
}

version_at_least() { # $1 >= $2, both dotted
	[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

kernel_release() { printf '%s' "${MITIGATOR_AGENT_KERNEL:-$(uname -r)}"; }

# The version the payload's packages carry (their upstream version): PAYLOAD_VERSION, once unpacked.
payload_version() { dpkg-deb -f "$PAYLOAD/mitigator-agent.deb" Version | sed 's/-[^-]*$//'; }

# --- preconditions (nothing is changed before they all hold) ---------------------------------

require_root() {
	[ "$(id -u)" = 0 ] || die "must run as root (try: sudo sh $PROG${1:+ $1})"
}

check_os() {
	arch=$(uname -m)
	[ "$arch" = x86_64 ] || die "unsupported machine $arch: this installer supports x86_64 only"
	[ -r /etc/os-release ] || die "cannot tell the distribution (no /etc/os-release): Debian 11/12/13 or Ubuntu 22.04/24.04 needed"
	os_id=$(. /etc/os-release && printf '%s' "$ID")
	os_version=$(. /etc/os-release && printf '%s' "${VERSION_ID:-}")
	case "$os_id $os_version" in
	"debian 11" | "debian 12" | "debian 13" | "ubuntu 22.04" | "ubuntu 24.04") ;;
	*) die "unsupported system ${os_id:-unknown} ${os_version:-(no version)}: Debian 11/12/13 or Ubuntu 22.04/24.04 needed" ;;
	esac
	[ -d /run/systemd/system ] || die "systemd is not running here (PID 1 is $(cat /proc/1/comm)): the agent needs a systemd host"
}

check_kernel() {
	release=$(kernel_release)
	config=${MITIGATOR_AGENT_KCONFIG:-/boot/config-$release}
	numeric=$(printf '%s' "$release" | sed 's/^\([0-9]*\.[0-9]*\).*/\1/')
	version_at_least "$numeric" "$OLDEST_KERNEL" ||
		die "kernel $release is older than $OLDEST_KERNEL, the oldest this module supports: upgrade the kernel"
	[ -r "$config" ] || die "cannot read the kernel's config $config: install the kernel's package (linux-image-$release)"
	for option in CONFIG_KPROBES CONFIG_KALLSYMS_ALL CONFIG_SYN_COOKIES; do
		grep -q "^$option=y" "$config" ||
			die "kernel $release lacks $option=y ($config): the module needs it; use a distribution kernel"
	done
}

# --- apt -------------------------------------------------------------------------------------

apt_get() {
	cmd apt-get -q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confold "$@"
}

# A run killed inside dpkg leaves it half-configured: finish that first.
finish_interrupted_dpkg() {
	[ -z "$(dpkg --audit 2>/dev/null)" ] && return 0
	cmd dpkg --configure -a || die "dpkg is in a broken state: run dpkg --configure -a and try again"
}

# The kernel's flavour (amd64, cloud-amd64, rt-amd64, generic ...): what follows the release's version
# and ABI, i.e. its first dash-separated part that starts with a letter. Empty for a kernel named otherwise.
kernel_flavour() {
	printf '%s\n' "$1" | awk -F- '{ for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]/) { f = $i; for (j = i + 1; j <= NF; j++) f = f "-" $j; print f; exit } }'
}

# The headers metapackage of the running kernel's flavour: it depends on the headers of the newest
# kernel of that flavour, so a kernel update brings its headers and DKMS builds the module for it
# before the reboot (linux-headers-KVER alone covers the running kernel only).
headers_metapackage() {
	flavour=$(kernel_flavour "$(kernel_release)")
	[ -n "$flavour" ] && printf 'linux-headers-%s\n' "$flavour"
}

# has_candidate PACKAGE: apt can install PACKAGE from its sources (after apt-get update).
has_candidate() {
	candidate=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
	[ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}

# What apt installs besides the payload's packages, into HEADERS: the running kernel's headers and the
# headers metapackage of its flavour (each when missing and available).
choose_headers() {
	HEADERS=
	headers="linux-headers-$(kernel_release)"
	if ! is_installed_pkg "$headers"; then
		has_candidate "$headers" ||
			die "no package $headers for the running kernel in the apt sources: install its headers, or boot a distribution kernel (apt install linux-image-amd64, reboot) and run this again"
		HEADERS=$headers
	fi
	meta=$(headers_metapackage)
	if [ -n "$meta" ] && ! is_installed_pkg "$meta"; then
		if has_candidate "$meta"; then
			HEADERS="$HEADERS${HEADERS:+ }$meta"
		else
			say "[!] no package $meta in the apt sources: after each kernel update, install that kernel's headers"
			say "    (linux-headers-NEWKERNEL) before rebooting, so that DKMS builds $MODULE for it"
		fi
	fi
}

install_packages() {
	apt_get update || die "apt-get update failed (see $LOG_FILE): check the apt sources and the network, then run this again"
	choose_headers
	# What was there before apt, kept on disk: a run killed inside apt leaves it for the next one.
	if [ ! -e "$APT_BEFORE" ]; then
		{ present_packages >"$APT_BEFORE.new" && mv "$APT_BEFORE.new" "$APT_BEFORE"; } ||
			die "cannot write $APT_BEFORE: is /var/lib writable?"
	fi
	pause_at apt
	apt_status=0
	# shellcheck disable=SC2086 # a list of package names
	apt_get install --no-install-recommends "$PAYLOAD/tcpsecrets-dkms.deb" "$PAYLOAD/mitigator-agent.deb" $HEADERS ||
		apt_status=$?
	record_apt_additions
	[ "$apt_status" = 0 ] ||
		die "installing $PACKAGES $PAYLOAD_VERSION${HEADERS:+ and $HEADERS} with apt-get failed (see $LOG_FILE): fix what it says, then run this again"
}

# Whatever apt added since APT_BEFORE (in this run or in one killed inside apt) is the install's:
# a rollback or an uninstall removes it again.
record_apt_additions() {
	[ -e "$APT_BEFORE" ] || return 0
	present_packages | comm -13 "$APT_BEFORE" - >>"$APT_ADDED"
	sort -u -o "$APT_ADDED" "$APT_ADDED"
	rm -f "$APT_BEFORE"
}

# What the install added besides the payload's packages (dkms, headers, compiler, python3 ...).
added_dependencies() {
	[ -r "$APT_ADDED" ] || return 0
	for package in $PACKAGES; do printf '%s\n' "$package"; done | sort | comm -23 "$APT_ADDED" -
}

# --- the module ------------------------------------------------------------------------------

# Before an update changes anything: the new module must build against the running kernel's headers,
# as DKMS will build it (kmod's Makefile, the kernel's build tree). DKMS's package scripts skip a kernel
# whose build tree is missing and call that success; after the switch the old module would be gone.
preflight_build() {
	release=$(kernel_release)
	build=/lib/modules/$release/build
	scratch=$PAYLOAD/preflight
	cmd dpkg-deb -x "$PAYLOAD/tcpsecrets-dkms.deb" "$scratch" || die "the payload is damaged: download the script again"
	src=$scratch/usr/src/$MODULE-$PAYLOAD_VERSION
	pause_at build
	if [ ! -d "$build" ] || ! cmd make -C "$src" KVER="$release" KDIR="$build"; then
		[ -d "$build" ] || say "[!] $build is missing"
		die "building the module for kernel $release failed (the compiler's output: $LOG_FILE): check that linux-headers-$release is installed whole (apt install --reinstall linux-headers-$release), then run this again"
	fi
	rm -rf "$scratch"
}

# After apt: the payload's version is configured, DKMS installed its module for the running kernel,
# and that module is the one loaded (the package's postinst swapped it).
check_module() {
	version=$PAYLOAD_VERSION
	release=$(kernel_release)
	for package in $PACKAGES; do
		[ "$(installed_version "$package")" = "$version" ] ||
			die "$package $version is not configured after apt (dpkg -l $PACKAGES; see $LOG_FILE): run this again"
	done
	dkms status -m "$MODULE" -v "$version" -k "$release" 2>/dev/null | grep -q ': installed' ||
		die "DKMS did not install the module for kernel $release (its make.log: /var/lib/dkms/$MODULE/$version/): check that linux-headers-$release is installed whole, then run this again"
	loaded=$(cat /sys/module/$MODULE/version 2>/dev/null || true)
	[ "$loaded" = "$version" ] || secure_boot_blocks_module ||
		die "the module $version does not load (loaded: ${loaded:-none}; see dmesg and $LOG_FILE)"
}

# Secure Boot on (EFI variable SecureBoot = 1) and DKMS's key not enrolled: the module loads only after
# the admin enrolls the key.
secure_boot_blocks_module() {
	variable=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
	[ -r "$variable" ] && [ "$(od -An -tu1 -j4 -N1 "$variable" | tr -d ' ')" = 1 ] || return 1
	if command -v mokutil >/dev/null 2>&1 && mokutil --test-key "$DKMS_MOK" 2>/dev/null | grep -q 'already enrolled'; then
		return 1
	fi
	say "[!] Secure Boot is on and DKMS's signing key ($DKMS_MOK) is not enrolled, so the kernel refuses the module."
	say "    Enroll it: apt install mokutil; mokutil --import $DKMS_MOK (choose a one-time password); reboot and"
	say "    confirm the key in MokManager. The module then loads at boot and the agent serves it."
	return 0
}

# --- a server installed by an older script ----------------------------------------------------

legacy_version() { cat "$LEGACY_VERSION" 2>/dev/null; }

# Move what the older script installed out of the packages' way, keeping it in $LEGACY for a rollback:
# its units (systemd keeps the running socket and service until the package's units take over), kernel
# hooks, settings, launcher and links, and its DKMS module (the loaded one stays in memory). Its records
# join this script's; its version file, the mark of such a server, goes last. Each step skips what an
# interrupted run already moved.
set_legacy_aside() {
	[ -e "$LEGACY_VERSION" ] || return 0
	say "[i] moving the install of an older script ($(legacy_version)) to the packages"
	cmd mkdir -p "$LEGACY" || die "cannot create $LEGACY"
	systemctl disable mitigator-agent.service mitigator-agent.socket >>"$LOG_FILE" 2>&1 || true
	for file in $LEGACY_FILES; do
		[ -e "$file" ] || [ -L "$file" ] || continue
		{ mkdir -p "$LEGACY$(dirname "$file")" && cmd mv "$file" "$LEGACY$file"; } || die "cannot move $file into $LEGACY"
	done
	cmd systemctl daemon-reload || die "systemctl daemon-reload failed (see $LOG_FILE)"
	for version in $(dkms_versions); do
		src=/usr/src/$MODULE-$version
		if [ -d "$src" ] && [ ! -d "$LEGACY$src" ]; then
			{ mkdir -p "$LEGACY/usr/src" && cmd cp -a "$src" "$LEGACY$src.new" && mv "$LEGACY$src.new" "$LEGACY$src"; } ||
				die "cannot keep a copy of $src"
		fi
		cmd dkms remove -m "$MODULE" -v "$version" --all || die "dkms remove $MODULE/$version failed (see $LOG_FILE)"
		cmd rm -rf "$src" || die "cannot remove $src"
	done
	mkdir -p "$LEGACY$LEGACY_STATE" || die "cannot create $LEGACY$LEGACY_STATE"
	# What apt installed for it joins this script's record (an uninstall removes it); the record itself
	# is kept for a rollback.
	if [ -e "$LEGACY_STATE/apt-installed" ]; then
		touch "$APT_ADDED" || die "cannot write $APT_ADDED"
		{ sort -u "$LEGACY_STATE/apt-installed" "$APT_ADDED" >"$APT_ADDED.new" && mv "$APT_ADDED.new" "$APT_ADDED" &&
			cmd mv "$LEGACY_STATE/apt-installed" "$LEGACY$LEGACY_STATE/"; } || die "cannot keep $LEGACY_STATE/apt-installed"
	fi
	# The value from before the first install, also under the package's name: its postinst keeps it.
	if [ -e "$LEGACY_STATE/tcp_syncookies-before" ]; then
		{ cp -p "$LEGACY_STATE/tcp_syncookies-before" "$LEGACY_STATE/tcp_syncookies.before" &&
			cmd mv "$LEGACY_STATE/tcp_syncookies-before" "$LEGACY$LEGACY_STATE/"; } ||
			die "cannot keep $LEGACY_STATE/tcp_syncookies-before"
	fi
	if [ -e "$LEGACY_STATE/created-dirs" ]; then
		cmd mv "$LEGACY_STATE/created-dirs" "$LEGACY$LEGACY_STATE/" || die "cannot move $LEGACY_STATE/created-dirs"
	fi
	cmd mv "$LEGACY_VERSION" "$LEGACY$LEGACY_VERSION" || die "cannot move $LEGACY_VERSION"
}

# The packages serve: drop what the older script left (its venvs, the directories it made, the copies).
drop_legacy() {
	[ -d "$LEGACY" ] || return 0
	for dir in "$LIB_DIR"/venv-*; do
		[ -d "$dir" ] && { cmd rm -rf "$dir" || say "[!] cannot remove the old $dir; remove it by hand"; }
	done
	if [ -r "$LEGACY$LEGACY_STATE/created-dirs" ]; then
		for dir in $(sort -r "$LEGACY$LEGACY_STATE/created-dirs"); do rmdir "$dir" 2>/dev/null || true; done
	fi
	cmd rm -rf "$LEGACY" || say "[!] cannot remove $LEGACY; remove it by hand"
	say "[i] the older script's install now runs as the packages $PACKAGES"
}

# A failed move to the packages: the older script's install comes back as it was, and serves again.
# Its module is built first, while the packages' agent still serves; then the packages go (their
# removal unloads their module and puts tcp_syncookies back), with what apt added for them in this
# run; what was set aside comes back, the agent package is purged (its postrm leaves alone an install
# with the older script's version file), and the older module is loaded and the older agent started.
# Each step that fails is said, with what to run; the rest goes on.
restore_legacy() {
	[ -d "$LEGACY" ] || return 0
	restore_release=$(kernel_release)
	record_apt_additions # a run killed inside apt never recorded them
	restore_modules=
	for restore_src in "$LEGACY/usr/src/$MODULE"-*; do
		[ -d "$restore_src" ] || continue
		restore_version=${restore_src##*/"$MODULE"-}
		if { [ -d "/usr/src/$MODULE-$restore_version" ] || cmd mv "$restore_src" "/usr/src/$MODULE-$restore_version"; } &&
			{ dkms_versions | grep -qx "$restore_version" || cmd dkms add -m "$MODULE" -v "$restore_version"; } &&
			cmd dkms build -m "$MODULE" -v "$restore_version" -k "$restore_release"; then
			restore_modules="$restore_modules $restore_version"
		else
			say "[!] DKMS could not build $MODULE $restore_version back: dkms install -m $MODULE -v $restore_version -k $restore_release"
		fi
	done
	case $(package_status mitigator-agent) in
	"" | not-installed | config-files) ;;
	*) cmd dpkg --remove mitigator-agent || say "[!] dpkg --remove mitigator-agent failed" ;;
	esac
	case $(package_status tcpsecrets-dkms) in
	"" | not-installed) ;;
	*) cmd dpkg --purge tcpsecrets-dkms || say "[!] dpkg --purge tcpsecrets-dkms failed" ;;
	esac
	# What apt added in this run (not for the older install): it goes as it came.
	restore_record=$LEGACY$LEGACY_STATE/apt-installed
	[ -e "$restore_record" ] || restore_record=/dev/null
	restore_added=$(added_dependencies | comm -23 - "$restore_record" | tr '\n' ' ')
	# shellcheck disable=SC2086 # a list of package names
	[ -z "$restore_added" ] || cmd dpkg --purge $restore_added || say "[!] some packages this run added stay: $restore_added"
	# The packages' removal takes away the state directory it found empty: back as the older script made it.
	mkdir -p -m 0700 "$LEGACY_STATE" || say "[!] cannot create $LEGACY_STATE"
	(cd "$LEGACY" && find . ! -type d) | sed 's/^\.//' | while read -r restore_file; do
		case $restore_file in /usr/src/*) continue ;; esac
		{ mkdir -p "$(dirname "$restore_file")" && mv "$LEGACY$restore_file" "$restore_file"; } || say "[!] cannot put back $restore_file (kept in $LEGACY$restore_file)"
	done
	rm -f "$LEGACY_STATE/tcp_syncookies.before" # the package's copy, if its postrm could not use it
	[ "$(package_status mitigator-agent)" != config-files ] || cmd dpkg --purge mitigator-agent ||
		say "[!] dpkg --purge mitigator-agent failed"
	for restore_version in $restore_modules; do
		cmd dkms install -m "$MODULE" -v "$restore_version" -k "$restore_release" ||
			say "[!] DKMS could not install $MODULE $restore_version: dkms install -m $MODULE -v $restore_version -k $restore_release"
	done
	cmd modprobe "$MODULE" || say "[!] cannot load $MODULE: modprobe $MODULE"
	[ ! -e /etc/sysctl.d/90-tcpsecrets.conf ] || cmd sysctl -q -p /etc/sysctl.d/90-tcpsecrets.conf ||
		say "[!] sysctl -p /etc/sysctl.d/90-tcpsecrets.conf failed"
	cmd systemctl daemon-reload || true
	{ cmd systemctl enable mitigator-agent.socket mitigator-agent.service && cmd systemctl start mitigator-agent.socket &&
		cmd systemctl restart mitigator-agent.service; } || say "[!] the older agent does not start: journalctl -u mitigator-agent"
	rm -rf "$LEGACY" "$STATE_DIR"
}

dkms_versions() {
	dkms status -m "$MODULE" 2>/dev/null | sed -n "s|^${MODULE}[/,] *\([^,:]*\).*|\1|p" | sort -u
}

# --- the agent -------------------------------------------------------------------------------

# The package's postinst (re)started the agent on its socket; wait until this run of the service says
# it listens. A run that finds it stopped (a kill at the wrong moment) starts it.
wait_for_agent() {
	if ! systemctl is-active -q mitigator-agent.socket || ! systemctl is-active -q mitigator-agent.service; then
		cmd systemctl start mitigator-agent.socket ||
			die "systemd cannot listen on port $PORT for the agent (ss -ltnp 'sport = :$PORT' shows who has it): journalctl -u mitigator-agent.socket"
		cmd systemctl restart mitigator-agent.service || die "the service does not start: journalctl -u mitigator-agent"
	fi
	invocation=$(systemctl show -p InvocationID --value mitigator-agent.service) || invocation=
	tries=0
	until [ -n "$invocation" ] &&
		journalctl -q _SYSTEMD_INVOCATION_ID="$invocation" -o cat --no-pager 2>/dev/null | grep -q '^listening on '; do
		tries=$((tries + 1))
		if [ $tries -gt 120 ] || ! systemctl is-active -q mitigator-agent.service; then
			journalctl -u mitigator-agent.service -n 10 --no-pager 2>/dev/null | sed 's/^/    /' >&2
			die "the agent does not stay up (journalctl -u mitigator-agent)"
		fi
		sleep 1
		[ -n "$invocation" ] || invocation=$(systemctl show -p InvocationID --value mitigator-agent.service) || invocation=
	done
	say "[i] mitigator-agent listening on port $PORT"
}

# The .debs of the version now installed, for a failed update to go back to.
keep_debs() {
	rm -rf "$KEPT_DEBS.new"
	{ mkdir -p "$KEPT_DEBS.new" && cp "$PAYLOAD/tcpsecrets-dkms.deb" "$PAYLOAD/mitigator-agent.deb" "$KEPT_DEBS.new/" &&
		rm -rf "$KEPT_DEBS" && mv "$KEPT_DEBS.new" "$KEPT_DEBS"; } || die "cannot keep the packages in $KEPT_DEBS"
}

# --- the end of an install -------------------------------------------------------------------

firewall_advice() {
	example="MITIGATOR_ADDRESS"
	if command -v ufw >/dev/null 2>&1 && ufw status 2>/dev/null | grep -q '^Status: active'; then
		say "    ufw is active: ufw allow from $example to any port $PORT proto tcp"
	elif command -v firewall-cmd >/dev/null 2>&1 && firewall-cmd --state >/dev/null 2>&1; then
		say "    firewalld is active: firewall-cmd --permanent --add-rich-rule='rule family=ipv4 source address=$example port port=$PORT protocol=tcp accept' && firewall-cmd --reload"
	elif command -v nft >/dev/null 2>&1 && nft list ruleset 2>/dev/null | grep -q 'hook input'; then
		chain=$(nft list ruleset 2>/dev/null | awk '/^table /{t=$2" "$3} /hook input/{print t; exit}')
		say "    nftables is active (input chain in table $chain): nft insert rule $chain input ip saddr $example tcp dport $PORT accept (name your chain if it is not 'input')"
	elif command -v iptables >/dev/null 2>&1 && iptables -S INPUT 2>/dev/null | grep -qv '^-P INPUT ACCEPT'; then
		say "    iptables is active: iptables -I INPUT -p tcp -s $example --dport $PORT -j ACCEPT (and keep it with your rules' persistence)"
	else
		say "    no firewall is active: port $PORT is open to everyone; allow only MITIGATOR's addresses if you can (README: Firewall)"
	fi
}

# Run a command and show its output, indented, on the terminal and in the log.
show() {
	say "[#] $*"
	output=$("$@" 2>&1)
	show_status=$?
	printf '%s\n' "$output" | sed 's/^/    /' >&2
	printf '%s\n' "$output" >>"$LOG_FILE"
	return $show_status
}

finish_install() {
	host_key_line=$(runuser -u "$SERVICE_USER" -- "$LAUNCHER" host-key --host-key "$HOST_KEY" 2>>"$LOG_FILE") ||
		die "cannot create or read the host key $HOST_KEY (see $LOG_FILE)"
	say ""
	show "$LAUNCHER" check || say "[!] check reports problems (above); the agent serves anyway"
	selftest=ok
	show "$LAUNCHER" selftest || selftest=failed
	say ""
	say "mitigator-agent $PAYLOAD_VERSION is installed and running (Debian packages: $PACKAGES)."
	say "Host key (MITIGATOR pins it): $host_key_line"
	say "Add MITIGATOR's key:  echo 'ssh-ed25519 AAAA... mitigator1' >> $KEYS_FILE   (or: mitigator-agent keys add ...)"
	say "Open TCP port $PORT to MITIGATOR:"
	firewall_advice
	say "Update: run this script again. Uninstall: mitigator-agent -d"
	[ "$selftest" = ok ] || die "the selftest failed (above): MITIGATOR's cookies would not work on this server yet"
}

# --- install and rollback --------------------------------------------------------------------

# On a failed run (its exit status is not 0): a first install takes away what it did, a failed move from
# an older script puts that install back, and a failed update that got as far as apt reinstalls the
# previous version's packages (kept from its install); before apt, an update has changed nothing.
rollback() {
	rollback_status=$?
	trap - EXIT INT TERM HUP
	ROLLBACK_ARMED=no
	[ "$rollback_status" = 0 ] && return 0
	if [ "$FIRST_INSTALL" = yes ]; then
		say "[!] install failed: removing what it did"
		UNINSTALL_QUIET=yes remove_everything "$ROLLBACK_PURGE"
	elif [ -d "$LEGACY" ]; then
		say "[!] moving to the packages failed: putting the older script's install ($PREVIOUS) back"
		restore_legacy
		say "[!] update failed: the previous version ($PREVIOUS) keeps running"
	else
		if [ "$APT_RAN" = yes ] && [ "$(installed_version mitigator-agent)" != "$PREVIOUS" ]; then
			if [ -r "$KEPT_DEBS/mitigator-agent.deb" ]; then
				say "[!] reinstalling the previous version ($PREVIOUS)"
				finish_interrupted_dpkg || true
				apt_get install --allow-downgrades --no-install-recommends "$KEPT_DEBS/tcpsecrets-dkms.deb" \
					"$KEPT_DEBS/mitigator-agent.deb" || say "[!] reinstalling $PREVIOUS failed (see $LOG_FILE)"
			else
				say "[!] the packages of $PREVIOUS were not kept (installed without this script): fix what is said below, then run this again"
			fi
		fi
		say "[!] update failed: the previous version ($PREVIOUS) keeps running"
	fi
	[ -n "${FAIL_MESSAGE:-}" ] && say "$FAIL_MESSAGE"
	exit "$rollback_status"
}

do_install() {
	require_root
	check_os
	check_kernel
	umask 022
	(umask 077 && : >>"$LOG_FILE") && chmod 0600 "$LOG_FILE"
	say "[i] $PROG $PAYLOAD_VERSION install, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), kernel $(kernel_release)"
	FIRST_INSTALL=yes
	PREVIOUS=$(legacy_version)
	[ -n "$PREVIOUS" ] || [ ! -d "$LEGACY" ] || PREVIOUS=$(cat "$LEGACY$LEGACY_VERSION" 2>/dev/null)
	[ -n "$PREVIOUS" ] || PREVIOUS=$(installed_version mitigator-agent)
	[ -n "$PREVIOUS" ] && FIRST_INSTALL=no
	if [ "$PREVIOUS" = "$PAYLOAD_VERSION" ]; then
		say "[i] $PREVIOUS is installed already: completing what is missing and checking it"
	elif [ "$FIRST_INSTALL" = no ]; then
		say "[i] updating $PREVIOUS to $PAYLOAD_VERSION"
	fi
	# A first install rolls back whatever it created; what existed before stays.
	ROLLBACK_PURGE=
	getent passwd "$SERVICE_USER" >/dev/null || ROLLBACK_PURGE="$ROLLBACK_PURGE user"
	[ -e "$HOME_DIR" ] || ROLLBACK_PURGE="$ROLLBACK_PURGE home"
	APT_RAN=no
	export DEBIAN_FRONTEND=noninteractive
	trap rollback EXIT
	trap 'FAIL_MESSAGE="$PROG: interrupted: run it again to complete the install"; exit 130' INT TERM HUP
	ROLLBACK_ARMED=yes
	mkdir -p -m 0700 "$STATE_DIR" || die "cannot create $STATE_DIR"
	finish_interrupted_dpkg
	# (the packages of the same version installed: apt leaves their module as it is)
	[ "$FIRST_INSTALL" = yes ] || [ "$(installed_version mitigator-agent)" = "$PAYLOAD_VERSION" ] || preflight_build
	set_legacy_aside
	APT_RAN=yes
	install_packages
	pause_at switch
	check_module
	wait_for_agent
	keep_debs
	trap - EXIT INT TERM HUP
	ROLLBACK_ARMED=no
	drop_legacy
	finish_install
}

# --- uninstall -------------------------------------------------------------------------------

# Remove what an install added: the packages (tcpsecrets-dkms purged: it keeps nothing of the admin's;
# mitigator-agent purged when $1 has "home", else removed, which keeps the keys, host key and user)
# and what apt added for them. A step that fails is shown (cmd) and sets UNINSTALL_FAILED.
remove_everything() {
	purge=$1
	REMOVED=no
	UNINSTALL_FAILED=no
	record_apt_additions # an install killed inside apt never recorded them
	dependencies=$(added_dependencies | tr '\n' ' ')
	case " $purge " in
	*" home "*) agent_action=--purge ;;
	*) agent_action=--remove ;;
	esac
	agent_status=$(package_status mitigator-agent)
	if [ -n "$agent_status" ] && [ "$agent_status" != not-installed ] &&
		{ [ "$agent_status" != config-files ] || [ "$agent_action" = --purge ]; }; then
		cmd dpkg "$agent_action" mitigator-agent || UNINSTALL_FAILED=yes
		REMOVED=yes
	fi
	dkms_status=$(package_status tcpsecrets-dkms)
	if [ -n "$dkms_status" ] && [ "$dkms_status" != not-installed ]; then
		cmd dpkg --purge tcpsecrets-dkms || UNINSTALL_FAILED=yes
		REMOVED=yes
	fi
	if [ -n "$dependencies" ]; then
		# Only what the install added; dpkg refuses any package something else now depends on.
		# shellcheck disable=SC2086 # a list of package names
		cmd dpkg --purge $dependencies ||
			say "[!] some packages the install added are still needed by others and stay: $dependencies"
		# The dkms we installed made its signing key for our builds; with dkms gone it signs nothing.
		if printf '%s\n' $dependencies | grep -qx dkms && ! is_installed_pkg dkms && [ -d /var/lib/dkms ] &&
			[ -z "$(find /var/lib/dkms -mindepth 1 ! -name 'mok.key' ! -name 'mok.pub')" ]; then
			cmd rm -rf /var/lib/dkms || say "[!] cannot remove /var/lib/dkms"
		fi
		REMOVED=yes
	fi
	if [ -d "$STATE_DIR" ]; then cmd rm -rf "$STATE_DIR" || UNINSTALL_FAILED=yes; fi
	case " $purge " in
	*" home "*) ;;
	*)
		if [ -e "$KEYS_FILE" ] || [ -e "$HOST_KEY" ]; then
			[ "${UNINSTALL_QUIET:-}" = yes ] || say "[i] kept: $KEYS_FILE and the host key $HOST_KEY (remove them with -d --purge)"
		fi ;;
	esac
	case " $purge " in
	*" user "*)
		# A first install's rollback when the home was there before: the package's purge did not run.
		if getent passwd "$SERVICE_USER" >/dev/null; then cmd userdel "$SERVICE_USER" || UNINSTALL_FAILED=yes; fi
		if getent group "$SERVICE_USER" >/dev/null; then cmd groupdel "$SERVICE_USER" || UNINSTALL_FAILED=yes; fi ;;
	esac
}

# -d --purge at a terminal: the keys and the host key MITIGATOR pins go for good, so ask first.
# Without a terminal (a script, ssh with a command) or with --yes: no question.
confirm_purge() {
	[ -t 0 ] || return 0
	fingerprint=
	if [ -f "$HOST_KEY" ] && command -v ssh-keygen >/dev/null 2>&1; then
		fingerprint=$(ssh-keygen -l -f "$HOST_KEY" 2>/dev/null | cut -d' ' -f2)
	fi
	say "[!] --purge removes for good: $KEYS_FILE, the host key $HOST_KEY${fingerprint:+ ($fingerprint)} and the"
	say "    $SERVICE_USER user. MITIGATOR pins that host key: a new install gets a new one, which MITIGATOR"
	say "    refuses until its admin is given the new fingerprint."
	printf 'Type purge to go on (anything else removes nothing): ' >&2
	answer=
	read -r answer || answer=
	[ "$answer" = purge ] || die "nothing removed (answered '$answer')"
}

do_uninstall() {
	require_root "-d${1:+ $1}"
	if [ -e "$LEGACY_VERSION" ] && [ -e "$LIB_DIR/install.sh" ] && ! is_installed_pkg mitigator-agent; then
		die "this server was installed by an older install script: uninstall with its own copy, sh $LIB_DIR/install.sh -d${1:+ $1}"
	fi
	[ "$1" != --purge ] || [ "${2:-}" = yes ] || confirm_purge
	umask 022
	(umask 077 && : >>"$LOG_FILE") 2>/dev/null && chmod 0600 "$LOG_FILE"
	say "[i] $PROG uninstall${1:+ ($1)}, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
	export DEBIAN_FRONTEND=noninteractive
	remove_everything "$([ "$1" = --purge ] && echo "home user")"
	[ "$UNINSTALL_FAILED" = no ] ||
		die "uninstall incomplete: the steps shown above failed; fix what they say and run $PROG -d${1:+ $1} again"
	if [ "$REMOVED" = no ]; then
		say "$PROG: nothing to remove (not installed)"
	else
		say "$PROG is uninstalled."
	fi
	[ "$1" = --purge ] && rm -f "$LOG_FILE"
	return 0
}

# --- main ------------------------------------------------------------------------------------

# The payload (added by `make dist`: the two .debs) is unpacked into a private directory that apt's
# unprivileged downloader may read; a kept copy has none.
unpack_payload() {
	command -v payload_archive >/dev/null 2>&1 ||
		die "this copy carries no payload and can only uninstall (-d): download the full mitigator-agent script to install"
	PAYLOAD=$(mktemp -d /tmp/mitigator-agent.XXXXXXXX) || die "cannot create a temporary directory"
	trap 'rm -rf "$PAYLOAD"' EXIT
	chmod 0755 "$PAYLOAD" && payload_archive | base64 -d | tar -xz -C "$PAYLOAD" ||
		die "the payload is damaged: download the script again"
	PAYLOAD_VERSION=$(payload_version) && [ -n "$PAYLOAD_VERSION" ] || die "the payload is damaged: download the script again"
}

main() {
	case "${1:-}" in
	-h | --help) usage ;;
	-d | --uninstall)
		shift
		purge= yes=
		for arg in "$@"; do
			case $arg in
			--purge) purge=--purge ;;
			--yes) yes=yes ;;
			*) usage >&2; exit 2 ;;
			esac
		done
		[ -n "$purge" ] || [ -z "$yes" ] || { usage >&2; exit 2; }
		do_uninstall "$purge" "$yes" ;;
	"")
		require_root
		unpack_payload
		install_status=0
		# Ctrl-C reaches every process of the terminal's group: the install (a subshell) rolls back
		# in its trap, and this shell waits for it to finish, then removes the payload.
		trap : INT TERM HUP
		(do_install) </dev/null || install_status=$?
		rm -rf "$PAYLOAD"
		trap - EXIT
		exit $install_status ;;
	*) usage >&2; exit 2 ;;
	esac
}

# @PAYLOAD@
main "$@"
