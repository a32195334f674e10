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

# has_decl HEADER PATTERN: like has, with the header's lines joined, so that
# PATTERN can match a declaration that spans several lines
has_decl() {
	for tree in "$src" "$obj"; do
		[ -f "$tree/$1" ] && tr '\n\t' '  ' <"$tree/$1" | grep -q -- "$2" && return 0
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
# ftrace callbacks get a struct ftrace_regs (5.11) instead of struct pt_regs.
has include/linux/ftrace.h 'struct ftrace_regs' &&
	echo -DTCPSECRETS_HAVE_FTRACE_REGS
# Setting the resume address from an ftrace callback: the newer name (6.x)
# or the older one (5.11+); before both, the callback gets pt_regs.
{ has include/linux/ftrace.h 'ftrace_regs_set_instruction_pointer' ||
  has include/linux/ftrace_regs.h 'ftrace_regs_set_instruction_pointer' ||
  has arch/x86/include/asm/ftrace.h 'ftrace_regs_set_instruction_pointer'; } &&
	echo -DTCPSECRETS_HAVE_FTRACE_REGS_SET_IP
# The 16-byte-aligned SipHash key type the kernel declares its secrets with
# (not yet in 5.10).
has include/linux/siphash.h 'siphash_aligned_key_t' &&
	echo -DTCPSECRETS_HAVE_SIPHASH_ALIGNED_KEY
# __cookie_v{4,6}_check() took the cookie as an argument until 6.8; since
# then they read it from the ACK themselves.
has_decl include/net/tcp.h '__cookie_v4_check([^)]*u32 cookie)' &&
	echo -DTCPSECRETS_HAVE_COOKIE_CHECK_COOKIE_ARG
exit 0
