// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel's SYN cookies on wall-clock minutes.
 *
 * A stock kernel's cookie counter is jiffies_64 / (60 * HZ): it depends on
 * the host's uptime, so MITIGATOR and servers behind one anycast address
 * cannot agree on it. MITIGATOR v23.08+ computes cookies with
 * count = CLOCK_REALTIME seconds / 60 instead, and expects the server's
 * kernel to do the same. With cookie_clock=wall the four exported cookie
 * functions (make and check, IPv4 and IPv6) are redirected to the versions
 * below, which are the kernel's algorithm with only the counter changed:
 * same secrets (the kernel's own keys, read in place), same SipHash inputs,
 * same 24-bit layout, same MSS tables, same two-minute window. In the
 * kernel's era (handover.c: at load and unload) they use its counter.
 *
 * The load checks that claim before redirecting anything: each function
 * here, run with the jiffies counter, must give the kernel's own answer for
 * every MSS table entry. A kernel whose cookies differ refuses the module.
 */
#include "internal.h"

#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/math64.h>
#include <linux/tcp.h>
#include <linux/timekeeping.h>
#include <net/tcp.h>

#include "compat.h"

#define COOKIE_BITS 24
#define COOKIE_MASK ((1U << COOKIE_BITS) - 1)
#define COOKIE_MAX_AGE 2	/* minutes: the current one and the one before */

static const u16 mss_v4[] = { 536, 1300, 1440, 1460 };
static const u16 mss_v6[] = { 1280 - 60, 1480 - 60, 1500 - 60, 9000 - 60 };

static bool wall;

/* The counter the kernel's cookies use at a given instant. */
u32 tcpsecrets_cookie_count(u64 realtime_ns, u64 jiffies64)
{
	if (wall)
		return div_u64(div_u64(realtime_ns, NSEC_PER_SEC), 60);
	return div_u64(jiffies64, 60 * HZ);
}

static u32 wall_count_now(void)
{
	return div_u64(ktime_get_real_seconds(), 60);
}

static u32 jiffies_count_now(void)
{
	return div_u64(get_jiffies_64(), 60 * HZ);
}

static u32 hash_v4(const struct iphdr *iph, const struct tcphdr *th, u32 count, int c)
{
	return siphash_4u32((__force u32)iph->saddr, (__force u32)iph->daddr,
			    (__force u32)th->source << 16 | (__force u32)th->dest,
			    count, &tcpsecrets_syncookie_keys(AF_INET)[c]);
}

static u32 hash_v6(const struct ipv6hdr *iph, const struct tcphdr *th, u32 count, int c)
{
	const struct {
		struct in6_addr saddr;
		struct in6_addr daddr;
		u32 count;
		__be16 sport;
		__be16 dport;
	} __aligned(SIPHASH_ALIGNMENT) message = {
		.saddr = iph->saddr,
		.daddr = iph->daddr,
		.count = count,
		.sport = th->source,
		.dport = th->dest,
	};

	return siphash(&message, offsetofend(typeof(message), dport),
		       &tcpsecrets_syncookie_keys(AF_INET6)[c]);
}

static int mss_index(const u16 *table, int n, u16 mss)
{
	int i;

	for (i = n - 1; i > 0; i--)
		if (mss >= table[i])
			break;
	return i;
}

/* cookie = h0 + client ISN + count << 24 + ((h(count) + mssind) mod 2^24) */
#define MAKE_COOKIE(hash, iph, th, count, mssind)				\
	((hash)(iph, th, 0, 0) + ntohl((th)->seq) + ((count) << COOKIE_BITS) +	\
	 (((hash)(iph, th, count, 1) + (mssind)) & COOKIE_MASK))

/* The MSS index a cookie carries, or a value past the table if invalid. */
#define COOKIE_MSS_INDEX(hash, iph, th, cookie, count) ({			\
	u32 rest_ = (cookie) - (hash)(iph, th, 0, 0) - (ntohl((th)->seq) - 1); \
	u32 age_ = ((count) - (rest_ >> COOKIE_BITS)) & (U32_MAX >> COOKIE_BITS); \
	age_ >= COOKIE_MAX_AGE ? U32_MAX :					\
		(rest_ - (hash)(iph, th, (count) - age_, 1)) & COOKIE_MASK;	\
})

static u32 make_v4(const struct iphdr *iph, const struct tcphdr *th, u16 *mssp, u32 count)
{
	int i = mss_index(mss_v4, ARRAY_SIZE(mss_v4), *mssp);

	*mssp = mss_v4[i];
	return MAKE_COOKIE(hash_v4, iph, th, count, i);
}

static int check_v4(const struct iphdr *iph, const struct tcphdr *th, u32 cookie, u32 count)
{
	u32 i = COOKIE_MSS_INDEX(hash_v4, iph, th, cookie, count);

	return i < ARRAY_SIZE(mss_v4) ? mss_v4[i] : 0;
}

static u32 make_v6(const struct ipv6hdr *iph, const struct tcphdr *th, u16 *mssp, u32 count)
{
	int i = mss_index(mss_v6, ARRAY_SIZE(mss_v6), *mssp);

	*mssp = mss_v6[i];
	return MAKE_COOKIE(hash_v6, iph, th, count, i);
}

static int check_v6(const struct ipv6hdr *iph, const struct tcphdr *th, u32 cookie, u32 count)
{
	u32 i = COOKIE_MSS_INDEX(hash_v6, iph, th, cookie, count);

	return i < ARRAY_SIZE(mss_v6) ? mss_v6[i] : 0;
}

/* The counter of an era (handover.c): ours only with cookie_clock=wall. */
static u32 count_of(int era)
{
	return era == TCPSECRETS_ERA_MODULE && wall ? wall_count_now() : jiffies_count_now();
}

/*
 * Whether the kernel will ask for this ACK's timestamp offset: it does when
 * the ACK echoes a timestamp (TSecr not 0), right after checking the cookie.
 */
static bool echoes_timestamp(const struct tcphdr *th)
{
	const u8 *opt = (const u8 *)(th + 1);
	int left = th->doff * 4 - (int)sizeof(*th);

	while (left > 0) {
		if (opt[0] == TCPOPT_EOL)
			break;
		if (opt[0] == TCPOPT_NOP) {
			opt++;
			left--;
			continue;
		}
		if (left < 2 || opt[1] < 2 || opt[1] > left)
			break;
		if (opt[0] == TCPOPT_TIMESTAMP && opt[1] == TCPOLEN_TIMESTAMP)
			return (opt[6] | opt[7] | opt[8] | opt[9]) != 0;
		left -= opt[1];
		opt += opt[1];
	}
	return false;
}

/*
 * The MSS of a cookie ACK, in the era that made it; 0 if neither took it.
 * noted: the era is remembered for the kernel's next question (handover.c).
 */
static int checked_v4(const struct iphdr *iph, const struct tcphdr *th, u32 cookie, bool note)
{
	int other, era = tcpsecrets_eras_to_check(&other);
	int mss = check_v4(iph, th, cookie, count_of(era));

	if (!mss && other >= 0) {
		mss = check_v4(iph, th, cookie, count_of(other));
		era = other;
	}
	if (mss)
		tcpsecrets_era_used(era);
	if (mss && note && echoes_timestamp(th))
		tcpsecrets_era_checked(AF_INET, &iph->daddr, &iph->saddr, th->dest, th->source, era);
	return mss;
}

static int checked_v6(const struct ipv6hdr *iph, const struct tcphdr *th, u32 cookie, bool note)
{
	int other, era = tcpsecrets_eras_to_check(&other);
	int mss = check_v6(iph, th, cookie, count_of(era));

	if (!mss && other >= 0) {
		mss = check_v6(iph, th, cookie, count_of(other));
		era = other;
	}
	if (mss)
		tcpsecrets_era_used(era);
	if (mss && note && echoes_timestamp(th))
		tcpsecrets_era_checked(AF_INET6, iph->daddr.s6_addr32, iph->saddr.s6_addr32,
				       th->dest, th->source, era);
	return mss;
}

/* The replacements: the kernel's signatures, the current era's counter. */
static u32 wall_cookie_v4_init_sequence(const struct iphdr *iph,
					const struct tcphdr *th, u16 *mssp)
{
	int era = tcpsecrets_era_making();

	tcpsecrets_era_used(era);
	return make_v4(iph, th, mssp, count_of(era));
}

static int wall_cookie_v4_check(COMPAT_COOKIE_CHECK_PARAMS(struct iphdr))
{
	return checked_v4(iph, th, compat_cookie_of(th), true);
}

static u32 wall_cookie_v6_init_sequence(const struct ipv6hdr *iph,
					const struct tcphdr *th, u16 *mssp)
{
	int era = tcpsecrets_era_making();

	tcpsecrets_era_used(era);
	return make_v6(iph, th, mssp, count_of(era));
}

static int wall_cookie_v6_check(COMPAT_COOKIE_CHECK_PARAMS(struct ipv6hdr))
{
	return checked_v6(iph, th, compat_cookie_of(th), true);
}

/* The MSS a cookie ACK carries as the kernel would check it now, or 0. */
int tcpsecrets_cookie_mss_v4(const struct iphdr *iph, const struct tcphdr *ack)
{
	return checked_v4(iph, ack, ntohl(ack->ack_seq) - 1, false);
}

int tcpsecrets_cookie_mss_v6(const struct ipv6hdr *iph, const struct tcphdr *ack)
{
	return checked_v6(iph, ack, ntohl(ack->ack_seq) - 1, false);
}

#define REDIRECT(kernel_fn, ours) \
	{ .name = #kernel_fn, .from = (unsigned long)kernel_fn, .to = (unsigned long)ours }

static struct tcpsecrets_redirect redirects[] = {
	REDIRECT(__cookie_v4_init_sequence, wall_cookie_v4_init_sequence),
	REDIRECT(__cookie_v4_check, wall_cookie_v4_check),
#if IS_ENABLED(CONFIG_IPV6)
	REDIRECT(__cookie_v6_init_sequence, wall_cookie_v6_init_sequence),
	REDIRECT(__cookie_v6_check, wall_cookie_v6_check),
#endif
};

/*
 * Our functions with the jiffies counter against the kernel's own, for one
 * SYN per MSS table entry: the cookie, the rounded MSS and the check of the
 * ACK must all agree. A minute boundary in between is retried.
 */
#define SELFTEST(family, table, make, check, kernel_make, kernel_check, iph)	\
({										\
	int i_, bad_ = 0;							\
	for (i_ = 0; i_ < ARRAY_SIZE(table) && !bad_; i_++) {			\
		struct tcphdr syn_ = { .source = htons(40000 + i_),		\
				       .dest = htons(7100),			\
				       .seq = htonl(0x9e3779b9u * (i_ + 1)) };	\
		struct tcphdr ack_ = syn_;					\
		int try_;							\
		for (try_ = 0; try_ < 3; try_++) {				\
			u32 count_ = jiffies_count_now();			\
			u16 kmss_ = table[i_] + 3, omss_ = kmss_;		\
			u32 kcookie_ = kernel_make(iph, &syn_, &kmss_);		\
			u32 ocookie_ = make(iph, &syn_, &omss_, count_);	\
			int kcheck_, ocheck_;					\
			ack_.seq = htonl(ntohl(syn_.seq) + 1);			\
			ack_.ack_seq = htonl(kcookie_ + 1);			\
			kcheck_ = compat_call_cookie_check(kernel_check, iph,	\
							   &ack_, kcookie_);	\
			ocheck_ = check(iph, &ack_, kcookie_, count_);		\
			if (count_ != jiffies_count_now())			\
				continue;					\
			if (kcookie_ != ocookie_ || kmss_ != omss_ ||		\
			    kcheck_ != table[i_] || ocheck_ != kcheck_) {	\
				pr_err("the kernel's IPv%d SYN cookies differ from ours (mss %u: cookie %08x vs %08x, check %d vs %d); refusing to change them\n", \
				       family, table[i_], kcookie_, ocookie_,	\
				       kcheck_, ocheck_);			\
				bad_ = 1;					\
			}							\
			break;							\
		}								\
	}									\
	bad_ ? -ENOEXEC : 0;							\
})

static int selftest(void)
{
	struct iphdr iph = { .saddr = htonl(0xc0000201), .daddr = htonl(0xc6336402) };
	int err;

	err = SELFTEST(4, mss_v4, make_v4, check_v4, __cookie_v4_init_sequence,
		       __cookie_v4_check, &iph);
#if IS_ENABLED(CONFIG_IPV6)
	if (!err) {
		struct ipv6hdr ip6h = {};

		ip6h.saddr.s6_addr32[0] = htonl(0x20010db8);
		ip6h.saddr.s6_addr32[3] = htonl(1);
		ip6h.daddr.s6_addr32[0] = htonl(0x20010db8);
		ip6h.daddr.s6_addr32[3] = htonl(2);
		err = SELFTEST(6, mss_v6, make_v6, check_v6,
			       __cookie_v6_init_sequence, __cookie_v6_check, &ip6h);
	}
#endif
	return err;
}

int tcpsecrets_cookie_clock_init(bool use_wall)
{
	int err;

	err = selftest();
	if (err)
		return err;
	if (!use_wall)
		return 0;
	err = tcpsecrets_redirects_on(redirects, ARRAY_SIZE(redirects));
	if (err)
		return err;
	wall = true;
	return 0;
}

void tcpsecrets_cookie_clock_exit(void)
{
	if (!wall)
		return;
	tcpsecrets_redirects_off(redirects, ARRAY_SIZE(redirects));
	wall = false;
}

bool tcpsecrets_cookie_clock_wall(void)
{
	return wall;
}
