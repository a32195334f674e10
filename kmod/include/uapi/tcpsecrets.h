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
#define TCPSECRETS_ABI_VERSION 1

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

struct tcpsecrets_snapshot {
	__u32 magic;			/* TCPSECRETS_MAGIC */
	__u16 abi_version;		/* TCPSECRETS_ABI_VERSION */
	__u16 size;			/* bytes of this struct the kernel filled in */
	__u32 flags;			/* TCPSECRETS_F_* */
	__u32 hz;			/* jiffies per second (CONFIG_HZ) */

	/* clocks, sampled together with the secrets */
	__u64 realtime_ns;		/* CLOCK_REALTIME, ns since the Unix epoch */
	__u64 tcp_clock_ms;		/* the TCP timestamp clock (CLOCK_MONOTONIC), ms */
	__u64 jiffies64;		/* jiffies_64; the cookie count is jiffies64 / (60 * hz) */

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
};

#endif /* _UAPI_TCPSECRETS_H */
