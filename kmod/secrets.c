// SPDX-License-Identifier: GPL-2.0
/*
 * Where the kernel keeps its TCP secrets, and the snapshot of them.
 *
 * The kernel creates each secret lazily, on first use, through
 * net_get_random_once(). Writing them ourselves would be overwritten by that
 * first use, so at load we make the kernel use each one (through exported
 * functions that hash with it) and only then export it.
 *
 * `set` (anycast) overwrites them in place -- the kernel's syncookie keys,
 * net_secret, and the module's ts_secret -- with every CPU stopped, so no
 * packet is ever hashed with half an old and half a new key.
 */
#include "internal.h"

#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/jiffies.h>
#include <linux/siphash.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/stop_machine.h>
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
	void *addr;
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

/* Serialises snapshots so a snapshot is one instant. */
static DEFINE_SPINLOCK(snapshot_lock);
/* Serialises `set`s, and counts them. */
static DEFINE_MUTEX(set_lock);
static u32 set_generation;

const siphash_key_t *tcpsecrets_syncookie_keys(int family)
{
	return family == AF_INET6 ? secrets[SYNCOOKIE6].addr : secrets[SYNCOOKIE].addr;
}

const siphash_key_t *tcpsecrets_net_secret(void)
{
	return secrets[NET].addr;
}

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
		secrets[i].addr = (void *)tcpsecrets_lookup(secrets[i].symbol);
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

/* The kernel's ts_secret, if it has one and it exists by now; else NULL. */
const siphash_key_t *tcpsecrets_kernel_ts_secret(void)
{
	const struct secret_location *s = &secrets[TS];

	if (!s->addr || all_zero(s->addr, s->size))
		return NULL;
	return s->addr;
}

static void fill_secret(struct tcpsecrets_snapshot *snap, int which, u8 *dest)
{
	const struct secret_location *s = &secrets[which];

	if (!s->addr || all_zero(s->addr, s->size))
		return;		/* absent, or not created yet: flag stays clear */
	memcpy(dest, s->addr, s->size);
	snap->flags |= s->flag;
}

/* The ts_secret in effect: the module's, which keys every TS offset. */
static void fill_ts_secret(struct tcpsecrets_snapshot *snap)
{
	siphash_key_t key;

	tcpsecrets_ts_secret_read(&key);
	memcpy(snap->ts_secret, &key, sizeof(snap->ts_secret));
	memzero_explicit(&key, sizeof(key));
	snap->flags |= TCPSECRETS_F_TS_SECRET | TCPSECRETS_F_TS_OFFSET_HOOK;
}

void tcpsecrets_take_snapshot(struct tcpsecrets_snapshot *snap)
{
	const struct net *net = &init_net;
	unsigned long irqflags;
	u64 tcp_ns;

	memset(snap, 0, sizeof(*snap));
	snap->magic = TCPSECRETS_MAGIC;
	snap->abi_version = TCPSECRETS_ABI_VERSION;
	snap->size = sizeof(*snap);
	snap->hz = HZ;
	snap->flags = COMPAT_HAS_TS_SECRET ? TCPSECRETS_F_ALG_TS_SECRET
					   : TCPSECRETS_F_ALG_SEQ_AND_TS_OFF;
	if (tcpsecrets_cookie_accept_active())
		snap->flags |= TCPSECRETS_F_COOKIE_ACCEPT;
	if (tcpsecrets_cookie_clock_wall())
		snap->flags |= TCPSECRETS_F_WALL_CLOCK;
	if (tcpsecrets_sendsyn_active())
		snap->flags |= TCPSECRETS_F_SENDSYN_DROP;
	if (gid_valid(tcpsecrets_write_group()))
		snap->flags |= TCPSECRETS_F_SET_ALLOWED;
	if (tcpsecrets_netns_accept_all())
		snap->flags |= TCPSECRETS_F_ACCEPT_ALL_NETNS;
	snap->netns_inum = init_net.ns.inum;
	snap->netns_refusing = tcpsecrets_netns_refusing();	/* takes a mutex: not under the lock */
	snap->cookies_refused = tcpsecrets_netns_refused_total();
	snap->cookie_clock = tcpsecrets_cookie_clock_wall() ? TCPSECRETS_CLOCK_WALL
							    : TCPSECRETS_CLOCK_JIFFIES;

	spin_lock_irqsave(&snapshot_lock, irqflags);
	snap->realtime_ns = ktime_get_real_ns();
	tcp_ns = tcp_clock_ns();
	snap->tcp_clock_ms = div_u64(tcp_ns, NSEC_PER_MSEC);
	snap->jiffies64 = get_jiffies_64();
	snap->cookie_count = tcpsecrets_cookie_count(snap->realtime_ns, snap->jiffies64);
	snap->ts_shift_ms = tcpsecrets_ts_shift(snap->realtime_ns, tcp_ns);
	snap->set_generation = READ_ONCE(set_generation);
	snap->sendsyn_dropped = tcpsecrets_sendsyn_dropped();
	fill_secret(snap, SYNCOOKIE, snap->syncookie_secret);
	fill_secret(snap, SYNCOOKIE6, snap->syncookie6_secret);
	fill_secret(snap, NET, snap->net_secret);
	fill_ts_secret(snap);
	snap->tcp_syncookies = READ_ONCE(net->ipv4.sysctl_tcp_syncookies);
	snap->tcp_timestamps = READ_ONCE(net->ipv4.sysctl_tcp_timestamps);
	snap->tcp_sack = READ_ONCE(net->ipv4.sysctl_tcp_sack);
	snap->tcp_window_scaling = READ_ONCE(net->ipv4.sysctl_tcp_window_scaling);
	snap->tcp_ecn = READ_ONCE(net->ipv4.sysctl_tcp_ecn);
	spin_unlock_irqrestore(&snapshot_lock, irqflags);
}

/* What stop_machine() runs on one CPU while all others spin. */
static int apply_set_stopped(void *data)
{
	const struct tcpsecrets_set *set = data;
	struct net *net = &init_net;
	siphash_key_t ts;

	memcpy(secrets[SYNCOOKIE].addr, set->syncookie_secret, secrets[SYNCOOKIE].size);
	if (secrets[SYNCOOKIE6].addr)
		memcpy(secrets[SYNCOOKIE6].addr, set->syncookie6_secret,
		       secrets[SYNCOOKIE6].size);
	memcpy(secrets[NET].addr, set->net_secret, secrets[NET].size);
	memcpy(&ts, set->ts_secret, sizeof(ts));
	tcpsecrets_ts_secret_write(&ts);
	memzero_explicit(&ts, sizeof(ts));

	WRITE_ONCE(net->ipv4.sysctl_tcp_ecn, set->tcp_ecn);
	WRITE_ONCE(net->ipv4.sysctl_tcp_sack, set->tcp_sack);
	WRITE_ONCE(net->ipv4.sysctl_tcp_timestamps, set->tcp_timestamps);
	WRITE_ONCE(net->ipv4.sysctl_tcp_window_scaling, set->tcp_window_scaling);
	return 0;
}

static bool value_within(s32 value, s32 lo, s32 hi)
{
	return value >= lo && value <= hi;
}

/*
 * Replace the secrets and init_net's sysctls with those of `set`, all at
 * once or not at all. The ranges are the kernel's own sysctl limits.
 */
int tcpsecrets_apply_set(const struct tcpsecrets_set *set)
{
	u32 generation = 0;
	int err;

	BUILD_BUG_ON(sizeof(set->ts_secret) != sizeof(siphash_key_t));
	if (set->magic != TCPSECRETS_SET_MAGIC ||
	    set->abi_version != TCPSECRETS_ABI_VERSION ||
	    set->size != sizeof(*set))
		return -EINVAL;
	if (!value_within(set->tcp_ecn, 0, 2) || !value_within(set->tcp_sack, 0, 1) ||
	    !value_within(set->tcp_timestamps, 0, 2) ||
	    !value_within(set->tcp_window_scaling, 0, 1))
		return -EINVAL;
	/* An all-zero key is what an unborn secret looks like: never that. */
	if (all_zero(set->syncookie_secret, sizeof(set->syncookie_secret)) ||
	    all_zero(set->syncookie6_secret, sizeof(set->syncookie6_secret)) ||
	    all_zero(set->net_secret, sizeof(set->net_secret)) ||
	    all_zero(set->ts_secret, sizeof(set->ts_secret)))
		return -EINVAL;

	mutex_lock(&set_lock);
	err = stop_machine(apply_set_stopped, (void *)set, NULL);
	if (!err) {
		generation = set_generation + 1;
		WRITE_ONCE(set_generation, generation);
	}
	mutex_unlock(&set_lock);
	/* MITIGATOR may set often; the generation in the snapshot counts them all. */
	if (!err)
		pr_info_ratelimited("secrets and TCP sysctls replaced by a set (generation %u)\n",
				    generation);
	return err;
}
