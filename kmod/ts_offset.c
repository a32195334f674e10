// SPDX-License-Identifier: GPL-2.0
/*
 * TCP timestamp offsets from the module's own ts_secret.
 *
 * MITIGATOR computes the TSval of its cookie SYN-ACKs as
 *   SipHash(ts_secret; saddr, daddr) + the server's TS clock
 * so the server's kernel must derive its per-connection TS offset that way.
 * Kernels up to 6.1.191 (and 5.10) do, with a ts_secret of their own;
 * 6.1.192+ and 6.12+ instead take the offset from the upper half of the ISN
 * SipHash keyed by net_secret, and have no ts_secret at all.
 *
 * So the module keeps a ts_secret on every kernel (the kernel's own where
 * it has one, else random; replaceable by `set`) and redirects the
 * functions that yield the offset:
 *   - secure_tcp{,v6}_ts_off() where the kernel has a ts_secret;
 *   - secure_tcp{,v6}_seq_and_ts_off() where it has not: the ISN half is
 *     computed exactly as the kernel does (checked at load), the offset
 *     half is ours.
 * In both, offset = SipHash(ts_secret; saddr, daddr) (0 unless
 * tcp_timestamps is 1, as the kernel does) + the wall-clock shift; in the
 * kernel's era (handover.c: at load and unload) they yield the kernel's own.
 *
 * The wall-clock shift (cookie_clock=wall): MITIGATOR's TS clock is the wall
 * clock in ms, plus 5 s of margin; the kernel's is CLOCK_MONOTONIC in ms.
 * Adding ((wall_ms - tcp_ms + 5000) & ~63) to every offset moves the
 * kernel's TS clock onto MITIGATOR's. Rounding to 64 leaves the six low
 * bits, where a cookie SYN-ACK encodes the client's options, untouched, so
 * a shift that moves by a step between the SYN-ACK and the ACK still
 * decodes them right.
 */
#include "internal.h"

#include <linux/kernel.h>
#include <linux/math64.h>
#include <linux/random.h>
#include <linux/string.h>
#include <linux/timekeeping.h>
#include <net/net_namespace.h>
#include <net/secure_seq.h>
#include <net/tcp.h>

#include "compat.h"

#define TS_SHIFT_MARGIN_MS 5000
#define TS_OPTION_BITS_MASK 63U

static siphash_aligned_key_t module_ts_secret;
static const siphash_key_t *kernel_ts_secret;	/* the kernel's own, where it has one */
static bool wall;

u32 tcpsecrets_ts_shift(u64 realtime_ns, u64 tcp_clock_ns)
{
	u32 wall_ms = div_u64(realtime_ns, NSEC_PER_MSEC);
	u32 tcp_ms = div_u64(tcp_clock_ns, NSEC_PER_MSEC);

	if (!wall)
		return 0;
	return (wall_ms - tcp_ms + TS_SHIFT_MARGIN_MS) & ~TS_OPTION_BITS_MASK;
}

u32 tcpsecrets_ts_shift_now(void)
{
	return wall ? tcpsecrets_ts_shift(ktime_get_real_ns(), tcp_clock_ns()) : 0;
}

void tcpsecrets_ts_secret_read(siphash_key_t *out)
{
	*out = module_ts_secret;
}

void tcpsecrets_ts_secret_write(const siphash_key_t *in)
{
	module_ts_secret = *in;
}

static bool timestamps_randomised(const struct net *net)
{
	return READ_ONCE(net->ipv4.sysctl_tcp_timestamps) == 1;
}

/* SipHash(key; saddr, daddr), or 0 unless tcp_timestamps is 1: the kernel's ts_secret offset. */
static u32 pair_off_v4(const struct net *net, __be32 saddr, __be32 daddr, const siphash_key_t *key)
{
	if (!timestamps_randomised(net))
		return 0;
	return siphash_2u32((__force u32)saddr, (__force u32)daddr, key);
}

static u32 pair_off_v6(const struct net *net, const __be32 *saddr, const __be32 *daddr,
		       const siphash_key_t *key)
{
	const struct {
		struct in6_addr saddr;
		struct in6_addr daddr;
	} __aligned(SIPHASH_ALIGNMENT) message = {
		.saddr = *(const struct in6_addr *)saddr,
		.daddr = *(const struct in6_addr *)daddr,
	};

	if (!timestamps_randomised(net))
		return 0;
	return siphash(&message, sizeof(message), key);
}

/* Our offsets (ERA_MODULE). */
static u32 ts_off_v4(const struct net *net, __be32 saddr, __be32 daddr)
{
	return pair_off_v4(net, saddr, daddr, &module_ts_secret) + tcpsecrets_ts_shift_now();
}

static u32 ts_off_v6(const struct net *net, const __be32 *saddr, const __be32 *daddr)
{
	return pair_off_v6(net, saddr, daddr, &module_ts_secret) + tcpsecrets_ts_shift_now();
}

#ifdef TCPSECRETS_HAVE_SEQ_AND_TS_OFF

/*
 * The ISN half, as net/core/secure_seq.c computes it (checked at load): a
 * keyed hash of the connection plus the clock, realtime in 64 ns ticks.
 */
static u32 isn_clock(void)
{
	return (u32)(ktime_get_real_ns() >> 6);
}

/* The whole hash: the ISN takes its lower half, the kernel's TS offset its upper half. */
static u64 isn_hash_v4(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport)
{
	u32 ports = (__force u32)sport << 16 | (__force u32)dport;

	return siphash_3u32((__force u32)saddr, (__force u32)daddr, ports,
				 tcpsecrets_net_secret());
}

static u64 isn_hash_v6(const __be32 *saddr, const __be32 *daddr, __be16 sport, __be16 dport)
{
	const struct {
		struct in6_addr saddr;
		struct in6_addr daddr;
		__be16 sport;
		__be16 dport;
	} __aligned(SIPHASH_ALIGNMENT) message = {
		.saddr = *(const struct in6_addr *)saddr,
		.daddr = *(const struct in6_addr *)daddr,
		.sport = sport,
		.dport = dport,
	};

	return siphash(&message, offsetofend(typeof(message), dport), tcpsecrets_net_secret());
}

static union tcp_seq_and_ts_off
our_seq_and_ts_off_v4(const struct net *net, __be32 saddr, __be32 daddr,
		      __be16 sport, __be16 dport)
{
	u64 hash = isn_hash_v4(saddr, daddr, sport, dport);
	union tcp_seq_and_ts_off st;

	st.seq = (u32)hash + isn_clock();
	if (tcpsecrets_era_for(AF_INET, &saddr, &daddr, sport, dport) == TCPSECRETS_ERA_MODULE)
		st.ts_off = ts_off_v4(net, saddr, daddr);
	else
		st.ts_off = timestamps_randomised(net) ? hash >> 32 : 0;
	return st;
}

static union tcp_seq_and_ts_off
our_seq_and_ts_off_v6(const struct net *net, const __be32 *saddr,
		      const __be32 *daddr, __be16 sport, __be16 dport)
{
	u64 hash = isn_hash_v6(saddr, daddr, sport, dport);
	union tcp_seq_and_ts_off st;

	st.seq = (u32)hash + isn_clock();
	if (tcpsecrets_era_for(AF_INET6, saddr, daddr, sport, dport) == TCPSECRETS_ERA_MODULE)
		st.ts_off = ts_off_v6(net, saddr, daddr);
	else
		st.ts_off = timestamps_randomised(net) ? hash >> 32 : 0;
	return st;
}

static struct tcpsecrets_redirect redirects[] = {
	{ .name = "secure_tcp_seq_and_ts_off",
	  .from = (unsigned long)secure_tcp_seq_and_ts_off,
	  .to = (unsigned long)our_seq_and_ts_off_v4 },
#if IS_ENABLED(CONFIG_IPV6)
	{ .name = "secure_tcpv6_seq_and_ts_off",
	  .from = (unsigned long)secure_tcpv6_seq_and_ts_off,
	  .to = (unsigned long)our_seq_and_ts_off_v6 },
#endif
};

/*
 * Our ISN half against the kernel's. The kernel adds the clock when it is
 * called, so the clock is read on both sides of that call: the kernel's ISN
 * minus our hash must fall between the two readings, however long the call
 * took (a loaded host under emulation can stall it for milliseconds). A
 * mismatch in the hash lands anywhere in 2^32; a step of the wall clock
 * during the call could too, hence a few attempts before refusing.
 */
static bool isn_matches(u32 kernel, u32 hash, u32 before, u32 after)
{
	return kernel - hash - before <= after - before;
}

static int selftest(void)
{
	const __be32 a4 = htonl(0xc0000201), b4 = htonl(0xc6336402);
	const __be32 a6[4] = { htonl(0x20010db8), 0, 0, htonl(1) };
	const __be32 b6[4] = { htonl(0x20010db8), 0, 0, htonl(2) };
	const __be16 sport = htons(7100), dport = htons(40000);
	u32 before, after, kernel4 = 0, kernel6 = 0;
	bool ok4 = false, ok6 = !IS_ENABLED(CONFIG_IPV6);
	int attempt;

	for (attempt = 0; attempt < 3 && !(ok4 && ok6); attempt++) {
		before = isn_clock();
		kernel4 = secure_tcp_seq_and_ts_off(&init_net, a4, b4, sport, dport).seq;
		after = isn_clock();
		ok4 = ok4 || isn_matches(kernel4, (u32)isn_hash_v4(a4, b4, sport, dport), before, after);
#if IS_ENABLED(CONFIG_IPV6)
		before = isn_clock();
		kernel6 = secure_tcpv6_seq_and_ts_off(&init_net, a6, b6, sport, dport).seq;
		after = isn_clock();
		ok6 = ok6 || isn_matches(kernel6, (u32)isn_hash_v6(a6, b6, sport, dport), before, after);
#endif
	}
	if (!ok4 || !ok6) {
		pr_err("the kernel's ISNs differ from ours (v4 %08x, hash %08x; v6 %08x, hash %08x); refusing to change them\n",
		       kernel4, (u32)isn_hash_v4(a4, b4, sport, dport), kernel6,
		       IS_ENABLED(CONFIG_IPV6) ? (u32)isn_hash_v6(a6, b6, sport, dport) : 0);
		return -ENOEXEC;
	}
	return 0;
}

#else /* the kernel has a module_ts_secret and secure_tcp{,v6}_ts_off() */

/*
 * The kernel's offsets (ERA_KERNEL): its own ts_secret, no shift. Had it
 * none yet at load, ours stands in; the kernel's is then unknown to us.
 */
static const siphash_key_t *kernel_key(void)
{
	return kernel_ts_secret ? kernel_ts_secret : &module_ts_secret;
}

static u32 our_ts_off_v4(const struct net *net, __be32 saddr, __be32 daddr)
{
	if (tcpsecrets_era_for(AF_INET, &saddr, &daddr, 0, 0) == TCPSECRETS_ERA_MODULE)
		return ts_off_v4(net, saddr, daddr);
	return pair_off_v4(net, saddr, daddr, kernel_key());
}

static u32 our_ts_off_v6(const struct net *net, const __be32 *saddr, const __be32 *daddr)
{
	if (tcpsecrets_era_for(AF_INET6, saddr, daddr, 0, 0) == TCPSECRETS_ERA_MODULE)
		return ts_off_v6(net, saddr, daddr);
	return pair_off_v6(net, saddr, daddr, kernel_key());
}

/* secure_tcp_ts_off() is not exported: found by name when redirected. */
static struct tcpsecrets_redirect redirects[] = {
	{ .name = "secure_tcp_ts_off",
	  .to = (unsigned long)our_ts_off_v4 },
#if IS_ENABLED(CONFIG_IPV6)
	{ .name = "secure_tcpv6_ts_off",
	  .from = (unsigned long)secure_tcpv6_ts_off,
	  .to = (unsigned long)our_ts_off_v6 },
#endif
};

/*
 * With the kernel's own ts_secret copied, our offset must be the kernel's
 * (the IPv6 one: it is the exported function of the pair).
 */
static int selftest(void)
{
	const __be32 a6[4] = { htonl(0x20010db8), 0, 0, htonl(1) };
	const __be32 b6[4] = { htonl(0x20010db8), 0, 0, htonl(2) };
	u32 kernel6, ours6;

	if (!timestamps_randomised(&init_net))
		return 0;	/* the kernel returns 0: nothing to compare */
	kernel6 = secure_tcpv6_ts_off(&init_net, a6, b6);
	ours6 = ts_off_v6(&init_net, a6, b6);	/* no shift before the redirect */
	if (kernel6 != ours6) {
		pr_err("the kernel's TS offsets differ from ours (%08x vs %08x); refusing to change them\n",
		       kernel6, ours6);
		return -ENOEXEC;
	}
	return 0;
}

#endif

/*
 * kernel_secret: the kernel's own, if it has one that exists by now
 * (copied, so that offsets do not change at load), else NULL (random).
 */
int tcpsecrets_ts_offset_init(const siphash_key_t *kernel_secret, bool use_wall)
{
	int err;

	kernel_ts_secret = kernel_secret;
	if (kernel_secret) {
		module_ts_secret = *kernel_secret;
		err = selftest();
	} else {
		get_random_bytes(&module_ts_secret, sizeof(module_ts_secret));
		err = COMPAT_HAS_TS_SECRET ? 0 : selftest();
	}
	if (err)
		goto err_wipe;
	wall = use_wall;
	err = tcpsecrets_redirects_on(redirects, ARRAY_SIZE(redirects));
	if (err)
		goto err_wipe;
	return 0;

err_wipe:
	wall = false;
	kernel_ts_secret = NULL;
	memzero_explicit(&module_ts_secret, sizeof(module_ts_secret));
	return err;
}

void tcpsecrets_ts_offset_exit(void)
{
	tcpsecrets_redirects_off(redirects, ARRAY_SIZE(redirects));
	wall = false;
	kernel_ts_secret = NULL;
	memzero_explicit(&module_ts_secret, sizeof(module_ts_secret));
}
