#!/bin/sh
# mitigator-agent install script: installs, updates (run it again) and removes (-d) the tcpsecrets
# kernel module (DKMS) and the mitigator-agent service on a Debian or Ubuntu server.
#
#   wget -O- https://example.org/mitigator-agent | sh      install or update (as root)
#   sh mitigator-agent -d [--purge [--yes]]                 uninstall (--purge: keys, host key, user too;
#                                                           at a terminal it asks first unless --yes)
#
# `make dist` appends the payload (module source, agent and its wheels) to this file as dist/mitigator-agent;
# the installed copy (/usr/lib/mitigator-agent/install.sh) carries none and only uninstalls.
# Everything is in functions and the last line calls main: a download cut short runs nothing.
#
# Test hooks (the system tests use them; an admin never needs to): MITIGATOR_AGENT_KERNEL (kernel release
# to check instead of `uname -r`), MITIGATOR_AGENT_KCONFIG (its config file), MITIGATOR_AGENT_STEP_PAUSE
# (a step name: the install stops there for a while, so a test can kill it at that step).

PROG=mitigator-agent
LIB_DIR=/usr/lib/mitigator-agent
KEPT_SCRIPT=$LIB_DIR/install.sh
LAUNCHER=$LIB_DIR/mitigator-agent
PATH_ENTRY=/usr/local/sbin/mitigator-agent
HOME_DIR=/opt/mitigator_agent
KEYS_FILE=$HOME_DIR/keys
HOST_KEY=$HOME_DIR/host.ed25519
STATE_DIR=/var/lib/mitigator-agent
APT_BEFORE=$STATE_DIR/packages-before-apt
LOG_FILE=/var/log/mitigator-agent-install.log
UNIT_FILE=/etc/systemd/system/mitigator-agent.service
SOCKET_FILE=/etc/systemd/system/mitigator-agent.socket
MODPROBE_FILE=/etc/modprobe.d/tcpsecrets.conf
SWAP_MARKER=/run/tcpsecrets-swap
MODULES_LOAD_FILE=/etc/modules-load.d/tcpsecrets.conf
SYSCTL_FILE=/etc/sysctl.d/90-tcpsecrets.conf
# Run after DKMS's hooks when a kernel or its headers are installed: loud when tcpsecrets was not built.
KERNEL_HOOK=/etc/kernel/postinst.d/zz-tcpsecrets
HEADERS_HOOK=/etc/kernel/header_postinst.d/zz-tcpsecrets
MAN_PAGE=/usr/local/share/man/man8/mitigator-agent.8
COMPLETION=/usr/local/share/bash-completion/completions/mitigator-agent
SERVICE_USER=mitigator_agent
MODULE=tcpsecrets
PORT=7100
OLDEST_KERNEL=5.10      # the oldest kernel the project's tests boot
DKMS_MOK=/var/lib/dkms/mok.pub

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
	cat <<EOF
Usage: sh $PROG [-d [--purge [--yes]]] [-h]

  (no option)  install, or update an existing install (keys and host key are kept)
  -d           uninstall: service, module (all DKMS versions), agent and system settings;
               keeps $KEYS_FILE and the host key ($HOST_KEY)
  -d --purge   uninstall and also remove the keys, the host key and the $SERVICE_USER user;
               at a terminal it asks first (the host key MITIGATOR pins is gone for good)
  --yes        with -d --purge: do not ask (scripts)
  -h           this help

Runs as root on Debian 11/12/13 or Ubuntu 22.04/24.04 (x86_64). Log: $LOG_FILE
EOF
}

# --- facts -----------------------------------------------------------------------------------

is_installed_pkg() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
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

payload_version() { cat "$PAYLOAD/kmod/VERSION"; }

# The agent's group id (create_user made the group); fails when there is none.
service_gid() {
	getent group "$SERVICE_USER" | cut -d: -f3 | grep -x '[0-9][0-9]*'
}

installed_version() { [ -r "$STATE_DIR/version" ] && cat "$STATE_DIR/version"; }

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

check_no_package_install() {
	if is_installed_pkg mitigator-agent; then
		die "the mitigator-agent Debian package is installed: update it with apt, or remove it (apt remove mitigator-agent) before using this script"
	fi
}

# --- apt -------------------------------------------------------------------------------------

apt_get() {
	cmd apt-get -q -y -o Dpkg::Options::=--force-confold "$@"
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

missing_packages() {
	# shellcheck disable=SC2046 # one package name or none
	for package in dkms "linux-headers-$(kernel_release)" $(headers_metapackage) python3 python3-venv kmod openssl; do
		is_installed_pkg "$package" || printf '%s\n' "$package"
	done
}

# has_candidate PACKAGE: apt can install PACKAGE from its sources (after apt-get update).
has_candidate() {
	candidate=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
	[ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}

install_packages() {
	# A run killed inside dpkg leaves it half-configured: finish that first.
	if [ -n "$(dpkg --audit 2>/dev/null)" ]; then
		cmd dpkg --configure -a || die "dpkg is in a broken state: run dpkg --configure -a and try again"
	fi
	missing=$(missing_packages | sort -u | tr '\n' ' ' | sed 's/ $//')
	if [ -z "$missing" ]; then
		record_apt_additions
		return 0
	fi
	say "[i] missing packages: $missing"
	apt_get update || die "apt-get update failed (see $LOG_FILE): check the apt sources and the network, then run this again"
	headers="linux-headers-$(kernel_release)"
	case " $missing " in
	*" $headers "*)
		has_candidate "$headers" ||
			die "no package $headers for the running kernel in the apt sources: install its headers, or boot a distribution kernel (apt install linux-image-amd64, reboot) and run this again" ;;
	esac
	meta=$(headers_metapackage)
	case " $missing " in
	*" $meta "*)
		if ! has_candidate "$meta"; then
			say "[!] no package $meta in the apt sources: after each kernel update, install that kernel's headers"
			say "    (linux-headers-NEWKERNEL) before rebooting, so that DKMS builds $MODULE for it"
			# shellcheck disable=SC2086 # a list of package names
			missing=$(printf '%s\n' $missing | grep -vx "$meta" | tr '\n' ' ' | sed 's/ $//')
		fi ;;
	esac
	# What was there before apt, kept on disk: a run killed inside apt leaves it for the next one.
	if [ ! -e "$APT_BEFORE" ]; then
		present_packages >"$APT_BEFORE.new" && mv "$APT_BEFORE.new" "$APT_BEFORE" ||
			die "cannot write $APT_BEFORE: is /var/lib writable?"
	fi
	pause_at apt
	# shellcheck disable=SC2086 # a list of package names
	apt_status=0
	apt_get install --no-install-recommends $missing || apt_status=$?
	record_apt_additions
	[ "$apt_status" = 0 ] || die "installing $missing with apt-get failed (see $LOG_FILE): fix apt, then run this again"
}

# Whatever apt added since APT_BEFORE (in this run or in one killed inside apt) is ours to remove
# on rollback or uninstall.
record_apt_additions() {
	[ -e "$APT_BEFORE" ] || return 0
	present_packages | comm -13 "$APT_BEFORE" - >>"$STATE_DIR/apt-installed"
	sort -u -o "$STATE_DIR/apt-installed" "$STATE_DIR/apt-installed"
	rm -f "$APT_BEFORE"
}

# --- the module ------------------------------------------------------------------------------

dkms_versions() {
	dkms status -m "$MODULE" 2>/dev/null | sed -n "s|^$MODULE[/,] *\([^,:]*\).*|\1|p" | sort -u
}

# Add and build this version beside any installed one (which keeps serving until the switch).
build_module() {
	build_version=$(payload_version)
	release=$(kernel_release)
	src=/usr/src/$MODULE-$build_version
	# A same-version reinstall keeps the installed build. A run killed half-way starts this version
	# afresh, unless DKMS had finished building it from exactly this source: that build is reused.
	dkms_versions | grep -qx "$build_version" || NEW_MODULE_VERSION=$build_version
	if dkms_versions | grep -qx "$build_version" || [ -d "$src" ]; then
		state=$(dkms status -m "$MODULE" -v "$build_version" -k "$release" 2>/dev/null)
		case $state in
		*': installed'*) ;;
		*': built'*) diff -r -q "$PAYLOAD/kmod" "$src" >/dev/null 2>&1 || state=stale ;;
		*) state=stale ;;
		esac
		if [ "$state" = stale ]; then
			cmd dkms remove -m "$MODULE" -v "$build_version" --all >/dev/null 2>&1 || true
			cmd rm -rf "$src" || die "cannot remove the stale module source $src"
		fi
	fi
	if [ ! -d "$src" ]; then
		cmd cp -R "$PAYLOAD/kmod" "$src.new" && cmd mv "$src.new" "$src" || die "cannot copy the module source to $src"
	fi
	dkms_versions | grep -qx "$build_version" || cmd dkms add -m "$MODULE" -v "$build_version" ||
		die "dkms add failed (see $LOG_FILE)"
	pause_at dkms
	if ! dkms status -m "$MODULE" -v "$build_version" -k "$release" 2>/dev/null | grep -Eq ': (built|installed)'; then
		if ! cmd dkms build -m "$MODULE" -v "$build_version" -k "$release"; then
			# The rollback removes DKMS's tree, make.log with it: the install log keeps a copy.
			for make_log in "/var/lib/dkms/$MODULE/$build_version/$release/$(uname -m)/log/make.log" \
				"/var/lib/dkms/$MODULE/$build_version/build/make.log"; do
				[ -r "$make_log" ] && { printf -- '--- %s\n' "$make_log"; cat "$make_log"; } >>"$LOG_FILE" && break
			done
			die "building the module for kernel $release failed (DKMS's output and make.log: $LOG_FILE): check that linux-headers-$release is installed whole (apt install --reinstall linux-headers-$release), then run this again"
		fi
	fi
}

activate_module() {
	active_version=$(payload_version)
	release=$(kernel_release)
	# The old version's files go first, so DKMS never has two versions installed; the running
	# module stays in memory until load_module replaces it.
	remove_other_module_versions "$active_version"
	if ! dkms status -m "$MODULE" -v "$active_version" -k "$release" 2>/dev/null | grep -q ': installed'; then
		cmd dkms install -m "$MODULE" -v "$active_version" -k "$release" --force || die "dkms install failed (see $LOG_FILE)"
	fi
}

remove_other_module_versions() {
	keep=$1
	for old in $(dkms_versions); do
		[ "$old" = "$keep" ] && continue
		cmd dkms remove -m "$MODULE" -v "$old" --all || say "[!] dkms remove $MODULE/$old failed; remove it by hand"
		cmd rm -rf "/usr/src/$MODULE-$old" || say "[!] cannot remove /usr/src/$MODULE-$old; remove it by hand"
	done
}

write_system_files() {
	gid=$(service_gid) || die "the group $SERVICE_USER does not exist (getent group $SERVICE_USER): run this again"
	umask 022
	{ sed "s/@GID@/$gid/" "$PAYLOAD/packaging/system/modprobe.conf.in" >"$MODPROBE_FILE.new" &&
		mv "$MODPROBE_FILE.new" "$MODPROBE_FILE"; } || die "cannot write $MODPROBE_FILE"
	say "[#] wrote $MODPROBE_FILE (read_gid=$gid)"
	cmd install -m 0644 "$PAYLOAD/packaging/system/modules-load.conf" "$MODULES_LOAD_FILE" ||
		die "cannot write $MODULES_LOAD_FILE"
	if [ ! -e "$STATE_DIR/tcp_syncookies-before" ]; then
		previous=$(cat /proc/sys/net/ipv4/tcp_syncookies) || die "cannot read net.ipv4.tcp_syncookies"
		{ printf '%s\n' "$previous" >"$STATE_DIR/tcp_syncookies-before.new" &&
			mv "$STATE_DIR/tcp_syncookies-before.new" "$STATE_DIR/tcp_syncookies-before"; } ||
			die "cannot write $STATE_DIR/tcp_syncookies-before"
		if [ "$previous" != 2 ]; then
			say "[i] net.ipv4.tcp_syncookies goes from $previous to 2 (restored on uninstall): the kernel then answers"
			say "    every SYN with a cookie; clients without TCP timestamps lose window scaling and SACK on those connections."
		fi
	fi
	cmd install -m 0644 "$PAYLOAD/packaging/system/sysctl.conf" "$SYSCTL_FILE" || die "cannot write $SYSCTL_FILE"
	for hook in "$KERNEL_HOOK" "$HEADERS_HOOK"; do
		cmd install -D -m 0755 "$PAYLOAD/packaging/system/kernel-hook" "$hook" || die "cannot write $hook"
	done
	cmd sysctl -q -p "$SYSCTL_FILE" || die "cannot set net.ipv4.tcp_syncookies=2"
}

load_module() {
	loaded=$(cat /sys/module/$MODULE/version 2>/dev/null || true)
	gid=$(service_gid) || die "the group $SERVICE_USER does not exist (getent group $SERVICE_USER): run this again"
	if [ -n "$loaded" ]; then
		if [ "$loaded" = "$(payload_version)" ] && [ "$(cat /sys/module/$MODULE/parameters/read_gid)" = "$gid" ]; then
			return 0
		fi
		# While the marker is there the running agent waits for the device instead of answering
		# "not loaded" (agent: snapshot.read_snapshot_across_swap).
		cmd touch "$SWAP_MARKER" || die "cannot write $SWAP_MARKER"
		cmd modprobe -r "$MODULE" || { rm -f "$SWAP_MARKER"; die "cannot unload the running $MODULE $loaded (in use?): stop what uses /dev/tcpsecrets and run this again"; }
	fi
	if ! cmd modprobe "$MODULE"; then
		rm -f "$SWAP_MARKER"
		if secure_boot_blocks_module; then
			return 0
		fi
		die "the module does not load (see dmesg and $LOG_FILE)"
	fi
	cmd rm -f "$SWAP_MARKER" || die "cannot remove $SWAP_MARKER"
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

# --- the agent -------------------------------------------------------------------------------

create_user() {
	if ! getent group "$SERVICE_USER" >/dev/null; then
		cmd groupadd --system "$SERVICE_USER" || die "cannot create group $SERVICE_USER"
	fi
	if ! getent passwd "$SERVICE_USER" >/dev/null; then
		cmd useradd --system --gid "$SERVICE_USER" --home-dir "$HOME_DIR" --no-create-home \
			--shell /usr/sbin/nologin --comment "MITIGATOR agent" "$SERVICE_USER" ||
			die "cannot create user $SERVICE_USER"
	fi
}

prepare_home() {
	[ -L "$HOME_DIR" ] && die "$HOME_DIR is a symbolic link: make it a directory"
	[ -d "$HOME_DIR" ] || cmd mkdir -m 0755 "$HOME_DIR" || die "cannot create $HOME_DIR"
	{ cmd chown "$SERVICE_USER:$SERVICE_USER" "$HOME_DIR" && cmd chmod 0755 "$HOME_DIR"; } ||
		die "cannot give $HOME_DIR to $SERVICE_USER (mode 0755)"
	if [ ! -e "$KEYS_FILE" ]; then
		{ (umask 027 && : >"$KEYS_FILE.new") && chgrp "$SERVICE_USER" "$KEYS_FILE.new" && mv "$KEYS_FILE.new" "$KEYS_FILE"; } ||
			die "cannot create $KEYS_FILE"
		say "[#] created empty $KEYS_FILE"
	elif [ -L "$KEYS_FILE" ] || [ ! -f "$KEYS_FILE" ]; then
		die "$KEYS_FILE is not a regular file: make it one (the agent never follows links)"
	else
		# Never world-writable, and readable by the agent: keep the content, fix only the mode bits.
		mode=$(stat -c %a "$KEYS_FILE") && owner=$(stat -c %U "$KEYS_FILE") || die "cannot read the mode of $KEYS_FILE"
		case "$owner" in root | "$SERVICE_USER") ;; *) cmd chown root "$KEYS_FILE" || die "cannot chown $KEYS_FILE" ;; esac
		[ $((0$mode & 022)) = 0 ] || cmd chmod go-w "$KEYS_FILE" || die "cannot chmod go-w $KEYS_FILE"
		if [ "$owner" != "$SERVICE_USER" ] && [ $((0$mode & 044)) = 0 ]; then
			{ cmd chgrp "$SERVICE_USER" "$KEYS_FILE" && cmd chmod g+r "$KEYS_FILE"; } ||
				die "cannot make $KEYS_FILE readable by the group $SERVICE_USER"
		fi
	fi
}

install_agent() {
	umask 022 # the agent's user runs it
	cmd mkdir -p "$LIB_DIR" || die "cannot create $LIB_DIR"
	venv=$LIB_DIR/venv-$(payload_version)-$$
	cmd python3 -m venv "$venv" || die "python3 -m venv failed (see $LOG_FILE)"
	pause_at venv
	# Exactly the locked versions, each wheel checked against the lock's hashes.
	cmd "$venv/bin/python" -m pip install -q --no-index --find-links "$PAYLOAD/wheels" \
		--disable-pip-version-check --require-hashes -r "$PAYLOAD/requirements.lock" ||
		die "installing the agent's wheels failed (see $LOG_FILE): this Python may be unsupported"
	"$venv/bin/mitigator-agent" --version >/dev/null 2>&1 || die "the new agent does not run (see $LOG_FILE)"
	NEW_VENV=$venv
}

# Switch the launcher to the new venv in one rename; the old venv goes after the new one serves.
activate_agent() {
	{ cmd ln -sfn "$NEW_VENV/bin/mitigator-agent" "$LAUNCHER.new" && cmd mv -T "$LAUNCHER.new" "$LAUNCHER"; } ||
		die "cannot point $LAUNCHER at the new agent"
	cmd ln -sfn "$LAUNCHER" "$PATH_ENTRY" || die "cannot link $PATH_ENTRY"
	# The man page and bash completion come from the CLI itself. Directories made for them are
	# recorded, so an uninstall removes exactly those.
	for dir in "$(dirname "$MAN_PAGE")" "$(dirname "$(dirname "$COMPLETION")")" "$(dirname "$COMPLETION")"; do
		[ -d "$dir" ] || { mkdir -p "$dir" && printf '%s\n' "$dir" >>"$STATE_DIR/created-dirs"; }
	done
	"$LAUNCHER" --version >/dev/null &&
		"$NEW_VENV/bin/python" -m mitigator_agent.manpage >"$MAN_PAGE" &&
		"$NEW_VENV/bin/python" -m mitigator_agent.completion >"$COMPLETION" &&
		say "[#] wrote $MAN_PAGE and $COMPLETION" || say "[!] could not write the man page or the completion"
	{ cmd install -m 0755 "$PAYLOAD/installer/mitigator-agent.sh" "$KEPT_SCRIPT.new" &&
		cmd mv "$KEPT_SCRIPT.new" "$KEPT_SCRIPT"; } || die "cannot keep the uninstaller as $KEPT_SCRIPT"
}

remove_old_venvs() {
	for dir in "$LIB_DIR"/venv-*; do
		if [ -d "$dir" ] && [ "$dir" != "$NEW_VENV" ]; then
			cmd rm -rf "$dir" || say "[!] cannot remove the old $dir; remove it by hand"
		fi
	done
	return 0
}

create_host_key() {
	out=$(runuser -u "$SERVICE_USER" -- "$LAUNCHER" host-key --host-key "$HOST_KEY" 2>>"$LOG_FILE") ||
		die "cannot create or read the host key $HOST_KEY (see $LOG_FILE)"
	HOST_KEY_LINE=$out
}

install_unit() {
	cmd install -m 0644 "$PAYLOAD/packaging/systemd/mitigator-agent.socket" "$SOCKET_FILE" || die "cannot write $SOCKET_FILE"
	cmd install -m 0644 "$PAYLOAD/packaging/systemd/mitigator-agent.service" "$UNIT_FILE" || die "cannot write $UNIT_FILE"
	cmd systemctl daemon-reload || die "systemctl daemon-reload failed (see $LOG_FILE)"
	cmd systemctl enable mitigator-agent.socket || die "cannot enable mitigator-agent.socket (see $LOG_FILE)"
	cmd systemctl enable mitigator-agent.service || die "cannot enable mitigator-agent.service (see $LOG_FILE)"
}

# Without systemd's socket (a first install, or an agent from before it), the agent that runs holds the
# port itself: it is stopped, and the socket takes the port. With it, the running agent serves on
# through the module swap and the restart hands over: no poll is refused.
stop_agent_without_socket() {
	systemctl is-active -q mitigator-agent.socket && return 0
	systemctl stop mitigator-agent.service >/dev/null 2>&1 || true
}

start_agent() {
	if ! systemctl is-active -q mitigator-agent.socket; then
		cmd systemctl start mitigator-agent.socket ||
			die "systemd cannot listen on port $PORT for the agent (ss -ltnp 'sport = :$PORT' shows who has it): journalctl -u mitigator-agent.socket"
	fi
	cmd systemctl restart mitigator-agent.service || die "the service does not start: journalctl -u mitigator-agent"
	# Up once this run of the service says it listens (the port itself is systemd's from the start).
	invocation=$(systemctl show -p InvocationID --value mitigator-agent.service) || invocation=
	tries=0
	until [ -n "$invocation" ] &&
		journalctl -q _SYSTEMD_INVOCATION_ID="$invocation" -o cat --no-pager 2>/dev/null | grep -q '^listening on '; do
		tries=$((tries + 1))
		if [ $tries -gt 120 ] || ! systemctl is-active -q mitigator-agent.service; then
			journalctl -u mitigator-agent.service -n 10 --no-pager 2>/dev/null | sed 's/^/    /' >&2
			return 1
		fi
		sleep 1
		[ -n "$invocation" ] || invocation=$(systemctl show -p InvocationID --value mitigator-agent.service) || invocation=
	done
	say "[i] mitigator-agent listening on port $PORT"
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
	say ""
	show "$LAUNCHER" check || say "[!] check reports problems (above); the agent serves anyway"
	SELFTEST=ok
	show "$LAUNCHER" selftest || SELFTEST=failed
	say ""
	say "mitigator-agent $(payload_version) is installed and running."
	say "Host key (MITIGATOR pins it): $HOST_KEY_LINE"
	say "Add MITIGATOR's key:  echo 'ssh-ed25519 AAAA... mitigator1' >> $KEYS_FILE   (or: mitigator-agent keys add ...)"
	say "Open TCP port $PORT to MITIGATOR:"
	firewall_advice
	say "Update: run this script again. Uninstall: mitigator-agent -d"
	[ "$SELFTEST" = ok ] || die "the selftest failed (above): MITIGATOR's cookies would not work on this server yet"
}

# --- install and rollback --------------------------------------------------------------------

rollback() {
	ROLLBACK_STATUS=$?
	trap - EXIT INT TERM HUP
	ROLLBACK_ARMED=no
	[ "$ROLLBACK_STATUS" = 0 ] && return 0
	if [ "$FIRST_INSTALL" = yes ]; then
		say "[!] install failed: removing what it did"
		UNINSTALL_QUIET=yes remove_everything "$ROLLBACK_PURGE"
	elif [ "$ACTIVATED" != yes ]; then
		[ -n "${NEW_VENV:-}" ] && cmd rm -rf "$NEW_VENV"
		if [ -n "${NEW_MODULE_VERSION:-}" ]; then
			cmd dkms remove -m "$MODULE" -v "$NEW_MODULE_VERSION" --all || true
			cmd rm -rf "/usr/src/$MODULE-$NEW_MODULE_VERSION" || say "[!] cannot remove /usr/src/$MODULE-$NEW_MODULE_VERSION"
		fi
		say "[!] update failed: the previous version ($(installed_version)) keeps running"
	fi
	[ -n "${FAIL_MESSAGE:-}" ] && say "$FAIL_MESSAGE"
	exit "$ROLLBACK_STATUS"
}

do_install() {
	require_root
	check_os
	check_no_package_install
	check_kernel
	umask 022
	(umask 077 && : >>"$LOG_FILE") && chmod 0600 "$LOG_FILE"
	say "[i] $PROG $(payload_version) install, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), kernel $(kernel_release)"
	FIRST_INSTALL=yes
	[ -e "$KEPT_SCRIPT" ] && FIRST_INSTALL=no
	[ "$FIRST_INSTALL" = no ] && say "[i] updating $(installed_version || echo '?') to $(payload_version)"
	# A first install rolls back whatever it created; what existed before stays.
	ROLLBACK_PURGE=
	getent passwd "$SERVICE_USER" >/dev/null || ROLLBACK_PURGE="$ROLLBACK_PURGE user"
	[ -e "$HOME_DIR" ] || ROLLBACK_PURGE="$ROLLBACK_PURGE home"
	ACTIVATED=no
	NEW_VENV=
	NEW_MODULE_VERSION=
	export DEBIAN_FRONTEND=noninteractive
	trap rollback EXIT
	trap 'FAIL_MESSAGE="$PROG: interrupted: run it again to complete the install"; exit 130' INT TERM HUP
	ROLLBACK_ARMED=yes
	mkdir -p -m 0700 "$STATE_DIR"
	install_packages
	create_user
	prepare_home
	build_module
	install_agent
	write_system_files
	install_unit
	pause_at switch
	# From here the new version replaces the old one.
	ACTIVATED=yes
	stop_agent_without_socket
	activate_module
	activate_agent
	load_module
	create_host_key
	start_agent || die "the agent does not stay up (journalctl -u mitigator-agent)"
	remove_old_venvs
	payload_version >"$STATE_DIR/version"
	trap - EXIT INT TERM HUP
	ROLLBACK_ARMED=no
	finish_install
}

# --- uninstall -------------------------------------------------------------------------------

# Remove what an install added. $1: extra things to purge ("keys user home", or "all").
# A step that fails is shown (cmd) and sets UNINSTALL_FAILED; the others still run.
remove_everything() {
	purge=$1
	removed=no
	UNINSTALL_FAILED=no
	if [ -e "$UNIT_FILE" ] || [ -e "$SOCKET_FILE" ] || systemctl is-enabled -q mitigator-agent.service 2>/dev/null; then
		cmd systemctl disable --now mitigator-agent.service || true
		if [ -e "$SOCKET_FILE" ]; then
			cmd systemctl disable --now mitigator-agent.socket || true
		fi
		cmd rm -f "$UNIT_FILE" "$SOCKET_FILE" || say "[!] cannot remove $UNIT_FILE or $SOCKET_FILE; remove them by hand"
		cmd systemctl daemon-reload || say "[!] systemctl daemon-reload failed"
		removed=yes
	fi
	if [ -d /sys/module/$MODULE ]; then
		cmd modprobe -r "$MODULE" || cmd rmmod "$MODULE" || say "[!] cannot unload $MODULE (in use?): it goes at the next reboot"
		removed=yes
	fi
	if command -v dkms >/dev/null 2>&1; then
		for installed in $(dkms_versions); do
			cmd dkms remove -m "$MODULE" -v "$installed" --all || say "[!] dkms remove $MODULE/$installed failed"
			removed=yes
		done
	fi
	for src in /usr/src/$MODULE-*; do
		[ -d "$src" ] || continue
		cmd rm -rf "$src" || UNINSTALL_FAILED=yes
		removed=yes
	done
	for file in "$MODPROBE_FILE" "$MODULES_LOAD_FILE" "$SYSCTL_FILE" "$KERNEL_HOOK" "$HEADERS_HOOK" "$PATH_ENTRY" \
		"$MAN_PAGE" "$COMPLETION"; do
		if [ -e "$file" ] || [ -L "$file" ]; then cmd rm -f "$file" || UNINSTALL_FAILED=yes; removed=yes; fi
	done
	# The directories the install made for them (deepest first), if nothing else is there.
	if [ -r "$STATE_DIR/created-dirs" ]; then
		for dir in $(sort -r "$STATE_DIR/created-dirs"); do
			rmdir "$dir" 2>/dev/null || true
		done
	fi
	if [ -r "$STATE_DIR/tcp_syncookies-before" ]; then
		cmd sysctl -q -w "net.ipv4.tcp_syncookies=$(cat "$STATE_DIR/tcp_syncookies-before")" || true
	fi
	if [ -d "$LIB_DIR" ]; then cmd rm -rf "$LIB_DIR" || UNINSTALL_FAILED=yes; removed=yes; fi
	record_apt_additions # an install killed inside apt never recorded them
	if [ -s "$STATE_DIR/apt-installed" ]; then
		# Only what the install added; dpkg refuses any package something else now depends on.
		# shellcheck disable=SC2046
		cmd dpkg --purge $(cat "$STATE_DIR/apt-installed") ||
			say "[!] some packages the install added are still needed by others and stay: $(cat "$STATE_DIR/apt-installed" | tr '\n' ' ')"
		# The dkms we installed made its signing key for our builds; with dkms gone it signs nothing.
		if grep -qx dkms "$STATE_DIR/apt-installed" && ! is_installed_pkg dkms && [ -d /var/lib/dkms ] &&
			[ -z "$(find /var/lib/dkms -mindepth 1 ! -name 'mok.key' ! -name 'mok.pub')" ]; then
			cmd rm -rf /var/lib/dkms || say "[!] cannot remove /var/lib/dkms"
		fi
		removed=yes
	fi
	if [ -d "$STATE_DIR" ]; then cmd rm -rf "$STATE_DIR" || UNINSTALL_FAILED=yes; removed=yes; fi
	case " $purge " in
	*" all "* | *" home "*)
		if [ -d "$HOME_DIR" ]; then cmd rm -rf "$HOME_DIR" || UNINSTALL_FAILED=yes; removed=yes; fi ;;
	*)
		if [ -e "$KEYS_FILE" ] || [ -e "$HOST_KEY" ]; then
			[ "${UNINSTALL_QUIET:-}" = yes ] || say "[i] kept: $KEYS_FILE and the host key $HOST_KEY (remove them with -d --purge)"
		fi ;;
	esac
	case " $purge " in
	*" all "* | *" user "*)
		if getent passwd "$SERVICE_USER" >/dev/null; then cmd userdel "$SERVICE_USER" || UNINSTALL_FAILED=yes; removed=yes; fi
		if getent group "$SERVICE_USER" >/dev/null; then cmd groupdel "$SERVICE_USER" || UNINSTALL_FAILED=yes; removed=yes; fi ;;
	esac
	REMOVED=$removed
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
	check_no_package_install
	[ "$1" != --purge ] || [ "${2:-}" = yes ] || confirm_purge
	umask 022
	(umask 077 && : >>"$LOG_FILE") 2>/dev/null && chmod 0600 "$LOG_FILE"
	say "[i] $PROG uninstall${1:+ ($1)}, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
	remove_everything "$([ "$1" = --purge ] && echo all)"
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

# The payload (added by `make dist`) is unpacked into a private directory; a kept copy has none.
unpack_payload() {
	command -v payload_archive >/dev/null 2>&1 ||
		die "this copy carries no payload and can only uninstall (-d): download the full mitigator-agent script to install"
	PAYLOAD=$(mktemp -d /tmp/mitigator-agent.XXXXXXXX) || die "cannot create a temporary directory"
	trap 'rm -rf "$PAYLOAD"' EXIT
	payload_archive | base64 -d | tar -xz -C "$PAYLOAD" || die "the payload is damaged: download the script again"
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
		(do_install) </dev/null || install_status=$?
		rm -rf "$PAYLOAD"
		trap - EXIT
		exit $install_status ;;
	*) usage >&2; exit 2 ;;
	esac
}

# @PAYLOAD@
main "$@"
