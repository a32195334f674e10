/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * tcpsecrets user-space ABI: the snapshot that each read() of /dev/tcpsecrets
 * returns, whole and sampled at one instant.
 *
 * Rules that keep old readers working:
 *  - the struct only grows at its end; nothing is ever moved or re-typed;
 *  - `size` says how many bytes the kernel filled in, a reader uses the fields
 *    that fit in it and ignores bytes it does not know;
 *  - `abi_version` changes only if a field changes meaning.
 *
 * The Python agent feeds this file to cffi's cdef() at run time: keep it to
 * fixed-width integer types, plain #define'd integer constants and one struct.
 * Lines starting with '#' other than '#define NAME <integer>' are dropped there.
 */
#ifndef _UAPI_TCPSECRETS_H
#define _UAPI_TCPSECRETS_H

#ifdef __KERNEL__
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;
#endif

#define TCPSECRETS_DEVICE_NAME "tcpsecrets"

#define TCPSECRETS_MAGIC 0x54435053		/* "TCPS" */
#define TCPSECRETS_ABI_VERSION 2		/* 2: the cookie counter may run on wall time */

/* flags: which secrets this snapshot holds */
#define TCPSECRETS_F_SYNCOOKIE 0x1		/* syncookie_secret (IPv4) */
#define TCPSECRETS_F_SYNCOOKIE6 0x2		/* syncookie6_secret (IPv6) */
#define TCPSECRETS_F_NET_SECRET 0x4		/* net_secret */
#define TCPSECRETS_F_TS_SECRET 0x8		/* ts_secret */
/* flags: the ISN / TCP timestamp offset algorithm this kernel runs (one is set) */
#define TCPSECRETS_F_ALG_TS_SECRET 0x100	/* ISN from net_secret, TS offset from ts_secret */
#define TCPSECRETS_F_ALG_SEQ_AND_TS_OFF 0x200	/* one 64-bit SipHash keyed by net_secret gives both */
/* flags: state of the module */
#define TCPSECRETS_F_COOKIE_ACCEPT 0x10000	/* cookie ACKs are accepted when tcp_syncookies=2 */
#define TCPSECRETS_F_WALL_CLOCK 0x20000		/* cookie_count = CLOCK_REALTIME s / 60 (else jiffies) */
/* TS offset = SipHash(ts_secret; saddr, daddr) + ts_shift_ms on any kernel (module's ts_secret) */
#define TCPSECRETS_F_TS_OFFSET_HOOK 0x40000
#define TCPSECRETS_F_SENDSYN_DROP 0x80000	/* SYNs carrying MITIGATOR's SendSyn marker are dropped */
#define TCPSECRETS_F_SET_ALLOWED 0x100000	/* a writer group may apply a tcpsecrets_set */
#define TCPSECRETS_F_ACCEPT_ALL_NETNS 0x200000	/* cookies accepted in every netns while init_net is at 2 */

/* cookie_clock values */
#define TCPSECRETS_CLOCK_JIFFIES 0		/* the stock kernel: jiffies_64 / (60 * HZ) */
#define TCPSECRETS_CLOCK_WALL 1			/* MITIGATOR v23.08+: CLOCK_REALTIME seconds / 60 */

struct tcpsecrets_snapshot {
	__u32 magic;			/* TCPSECRETS_MAGIC */
	__u16 abi_version;		/* TCPSECRETS_ABI_VERSION */
	__u16 size;			/* bytes of this struct the kernel filled in */
	__u32 flags;			/* TCPSECRETS_F_* */
	__u32 hz;			/* jiffies per second (CONFIG_HZ) */

	/* clocks, sampled together with the secrets */
	__u64 realtime_ns;		/* CLOCK_REALTIME, ns since the Unix epoch */
	__u64 tcp_clock_ms;		/* the TCP timestamp clock (CLOCK_MONOTONIC), ms */
	__u64 jiffies64;		/* jiffies_64 (the stock cookie count is jiffies64 / (60 * hz)) */

	/* secrets, bytes in kernel memory order; all zero where the flag is clear */
	__u8 syncookie_secret[32];	/* two SipHash keys: [0..15] and [16..31] */
	__u8 syncookie6_secret[32];
	__u8 net_secret[16];
	__u8 ts_secret[16];

	/* init_net's sysctls */
	__s32 tcp_syncookies;
	__s32 tcp_timestamps;
	__s32 tcp_sack;
	__s32 tcp_window_scaling;
	__s32 tcp_ecn;
	__u32 reserved;			/* zero; keeps the size a multiple of 8 */

	/* ABI 2: the clocks the kernel's cookies and timestamps run on */
	__u32 cookie_clock;		/* TCPSECRETS_CLOCK_* */
	__u32 cookie_count;		/* the SYN-cookie counter the kernel uses at realtime_ns */
	__u32 ts_shift_ms;		/* added to every TS offset (wall clock only; else 0) */
	__u32 set_generation;		/* tcpsecrets_set writes applied since load (0: none) */
	__u64 sendsyn_dropped;		/* SYNs dropped for MITIGATOR's SendSyn marker */

	/* network namespaces (readers are always in init_net) */
	__u32 netns_inum;		/* the reader's (= the initial) netns inode, as in net:[N] */
	__u32 netns_refusing;		/* namespaces that would refuse cookies now */
	__u64 cookies_refused;		/* valid cookie ACKs refused in any namespace since load */
};

/*
 * Anycast: one write() of this struct to /dev/tcpsecrets (opened for writing
 * by root or the module's write_gid group) replaces the secrets and init_net's
 * sysctls below, all at once with every CPU stopped, or nothing (-EINVAL for a
 * bad magic, size or value).  ts_secret keys the TS offset the module makes the
 * kernel use (TCPSECRETS_F_TS_OFFSET_HOOK).
 */
#define TCPSECRETS_SET_MAGIC 0x54435357		/* "TCSW" */

struct tcpsecrets_set {
	__u32 magic;			/* TCPSECRETS_SET_MAGIC */
	__u16 abi_version;		/* TCPSECRETS_ABI_VERSION */
	__u16 size;			/* sizeof(struct tcpsecrets_set) */
	__u8 net_secret[16];
	__u8 syncookie_secret[32];
	__u8 syncookie6_secret[32];
	__u8 ts_secret[16];
	__s32 tcp_ecn;			/* 0..2 */
	__s32 tcp_sack;			/* 0..1 */
	__s32 tcp_timestamps;		/* 0..2 */
	__s32 tcp_window_scaling;	/* 0..1 */
};

#endif /* _UAPI_TCPSECRETS_H */
