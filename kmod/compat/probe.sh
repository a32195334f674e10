#!/bin/sh
# Feature probes for the kernel being built against. Prints -D flags for
# compat.h; every probe looks at a header of that kernel, none at its version.
#   probe.sh SRCTREE [OBJTREE]
src=$1
obj=${2:-$1}

# has HEADER PATTERN: the header (in either tree) mentions PATTERN
has() {
	for tree in "$src" "$obj"; do
		[ -f "$tree/$1" ] && grep -q -- "$2" "$tree/$1" && return 0
	done
	return 1
}

# One 64-bit SipHash keyed by net_secret gives the ISN and the TS offset
# (upstream 7.0, backported to 6.1.192 and 6.12): no ts_secret any more.
has include/net/secure_seq.h 'secure_tcp_seq_and_ts_off' &&
	echo -DTCPSECRETS_HAVE_SEQ_AND_TS_OFF
# The older scheme: a separate ts_secret behind secure_tcp{,v6}_ts_off().
has include/net/secure_seq.h 'secure_tcpv6_ts_off' &&
	echo -DTCPSECRETS_HAVE_TS_OFF
# struct proc_ops replaced file_operations for /proc entries (5.6).
has include/linux/proc_fs.h 'struct proc_ops' &&
	echo -DTCPSECRETS_HAVE_PROC_OPS
exit 0
