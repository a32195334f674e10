// SPDX-License-Identifier: GPL-2.0
/*
 * Where the kernel keeps its TCP secrets, and the snapshot of them.
 *
 * The kernel creates each secret lazily, on first use, through
 * net_get_random_once(). Writing them ourselves would be overwritten by that
 * first use, so at load we make the kernel use each one (through exported
 * functions that hash with it) and only then export it.
 */
#include "internal.h"

#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/jiffies.h>
#include <linux/siphash.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/tcp.h>
#include <linux/timekeeping.h>
#include <net/net_namespace.h>
#include <net/secure_seq.h>
#include <net/tcp.h>

#include "compat.h"

struct secret_location {
	const char *symbol;
	size_t size;
	u32 flag;
	bool required;
	const void *addr;
};

enum { SYNCOOKIE, SYNCOOKIE6, NET, TS, NR_SECRETS };

static struct secret_location secrets[NR_SECRETS] = {
	[SYNCOOKIE] = { "syncookie_secret", 2 * sizeof(siphash_key_t),
			TCPSECRETS_F_SYNCOOKIE, true },
	[SYNCOOKIE6] = { "syncookie6_secret", 2 * sizeof(siphash_key_t),
			 TCPSECRETS_F_SYNCOOKIE6, IS_ENABLED(CONFIG_IPV6) },
	[NET] = { "net_secret", sizeof(siphash_key_t),
		  TCPSECRETS_F_NET_SECRET, true },
	[TS] = { "ts_secret", sizeof(siphash_key_t),
		 TCPSECRETS_F_TS_SECRET, COMPAT_HAS_TS_SECRET },
};

/* Serialises snapshots (and, later, writers) so a snapshot is one instant. */
static DEFINE_SPINLOCK(snapshot_lock);

static void force_syncookie_secrets(void)
{
	struct tcphdr th = {};
	u16 mss = 1460;
	struct iphdr iph = {};
#if IS_ENABLED(CONFIG_IPV6)
	struct ipv6hdr ip6h = {};

	__cookie_v6_init_sequence(&ip6h, &th, &mss);
#endif
	__cookie_v4_init_sequence(&iph, &th, &mss);
}

static bool all_zero(const void *p, size_t n)
{
	return !memchr_inv(p, 0, n);
}

int tcpsecrets_secrets_init(void)
{
	int i;

	BUILD_BUG_ON(sizeof(((struct tcpsecrets_snapshot *)0)->syncookie_secret) !=
		     2 * sizeof(siphash_key_t));
	BUILD_BUG_ON(sizeof(((struct tcpsecrets_snapshot *)0)->net_secret) !=
		     sizeof(siphash_key_t));
	BUILD_BUG_ON(sizeof(struct tcpsecrets_snapshot) % 8);

	/* The headers must describe the kernel we are loaded into. */
	if (COMPAT_HAS_TS_SECRET != !!tcpsecrets_lookup("ts_secret")) {
		pr_err("ts_secret is %s in the running kernel but %s in the headers this module was built with\n",
		       COMPAT_HAS_TS_SECRET ? "missing" : "present",
		       COMPAT_HAS_TS_SECRET ? "present" : "absent");
		return -ENOEXEC;
	}

	for (i = 0; i < NR_SECRETS; i++) {
		if (!secrets[i].required)
			continue;
		secrets[i].addr = (const void *)tcpsecrets_lookup(secrets[i].symbol);
		if (!secrets[i].addr) {
			pr_err("kernel symbol %s not found (needs CONFIG_KALLSYMS_ALL)\n",
			       secrets[i].symbol);
			return -ENOENT;
		}
	}

	force_syncookie_secrets();
	secure_ipv4_port_ephemeral(0, 0, 0);	/* creates net_secret */
	compat_force_ts_secret();

	for (i = 0; i < NR_SECRETS; i++) {
		if (i == TS || !secrets[i].addr)
			continue;	/* ts_secret may stay unborn: see compat.h */
		if (all_zero(secrets[i].addr, secrets[i].size)) {
			pr_err("%s is still all zeros after forcing its creation\n",
			       secrets[i].symbol);
			return -EIO;
		}
	}
	return 0;
}

static void fill_secret(struct tcpsecrets_snapshot *snap, int which, u8 *dest)
{
	const struct secret_location *s = &secrets[which];

	if (!s->addr || all_zero(s->addr, s->size))
		return;		/* absent, or not created yet: flag stays clear */
	memcpy(dest, s->addr, s->size);
	snap->flags |= s->flag;
}

void tcpsecrets_take_snapshot(struct tcpsecrets_snapshot *snap)
{
	const struct net *net = &init_net;
	unsigned long irqflags;

	/* ts_secret is born only while tcp_timestamps == 1; retry each time. */
	if (secrets[TS].addr && all_zero(secrets[TS].addr, secrets[TS].size))
		compat_force_ts_secret();

	memset(snap, 0, sizeof(*snap));
	snap->magic = TCPSECRETS_MAGIC;
	snap->abi_version = TCPSECRETS_ABI_VERSION;
	snap->size = sizeof(*snap);
	snap->hz = HZ;
	snap->flags = COMPAT_HAS_TS_SECRET ? TCPSECRETS_F_ALG_TS_SECRET
					   : TCPSECRETS_F_ALG_SEQ_AND_TS_OFF;
	if (tcpsecrets_cookie_accept_active())
		snap->flags |= TCPSECRETS_F_COOKIE_ACCEPT;

	spin_lock_irqsave(&snapshot_lock, irqflags);
	snap->realtime_ns = ktime_get_real_ns();
	snap->tcp_clock_ms = div_u64(tcp_clock_ns(), NSEC_PER_MSEC);
	snap->jiffies64 = get_jiffies_64();
	fill_secret(snap, SYNCOOKIE, snap->syncookie_secret);
	fill_secret(snap, SYNCOOKIE6, snap->syncookie6_secret);
	fill_secret(snap, NET, snap->net_secret);
	fill_secret(snap, TS, snap->ts_secret);
	snap->tcp_syncookies = READ_ONCE(net->ipv4.sysctl_tcp_syncookies);
	snap->tcp_timestamps = READ_ONCE(net->ipv4.sysctl_tcp_timestamps);
	snap->tcp_sack = READ_ONCE(net->ipv4.sysctl_tcp_sack);
	snap->tcp_window_scaling = READ_ONCE(net->ipv4.sysctl_tcp_window_scaling);
	snap->tcp_ecn = READ_ONCE(net->ipv4.sysctl_tcp_ecn);
	spin_unlock_irqrestore(&snapshot_lock, irqflags);
}
