// SPDX-License-Identifier: GPL-2.0
/*
 * Drop the SYNs MITIGATOR's dataplane sends in its SendSyn mode.
 *
 * MITIGATOR marks those SYNs in the TCP urgent-pointer field; the server
 * must drop them before its TCP stack answers. The marker is the one the
 * isn_sync module tests for: the raw 16-bit field equal to 0x0100 as an
 * x86 load sees it, i.e. wire bytes 00 01 (ntohs(urg_ptr) == 1). Any SYN
 * with another urgent pointer, and every non-SYN, passes untouched.
 *
 * A netfilter hook at LOCAL_IN, IPv4 and IPv6, in every network namespace
 * (present and future: containers included), sees each packet addressed to
 * this host before TCP does; no kernel function is replaced. Every drop is
 * counted; the count is in the snapshot.
 */
#include "internal.h"

#include <linux/atomic.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/skbuff.h>
#include <linux/tcp.h>
#include <net/ip.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>

/* The urgent-pointer field as it sits in the packet: bytes 00 01. */
#define SENDSYN_MARKER htons(0x0001)

static atomic64_t dropped = ATOMIC64_INIT(0);
static bool active;

static bool is_marked_syn(const struct sk_buff *skb, unsigned int offset)
{
	struct tcphdr buf;
	const struct tcphdr *th = skb_header_pointer(skb, offset, sizeof(buf), &buf);

	return th && th->syn && !th->ack && th->urg_ptr == SENDSYN_MARKER;
}

static unsigned int verdict(bool marked)
{
	if (!marked)
		return NF_ACCEPT;
	atomic64_inc(&dropped);
	return NF_DROP;
}

static unsigned int sendsyn_v4(void *priv, struct sk_buff *skb,
			       const struct nf_hook_state *state)
{
	const struct iphdr *iph = ip_hdr(skb);

	if (iph->protocol != IPPROTO_TCP || ip_is_fragment(iph))
		return NF_ACCEPT;
	return verdict(is_marked_syn(skb, skb_network_offset(skb) + ip_hdrlen(skb)));
}

#if IS_ENABLED(CONFIG_IPV6)
static unsigned int sendsyn_v6(void *priv, struct sk_buff *skb,
			       const struct nf_hook_state *state)
{
	unsigned int offset = 0;
	unsigned short frag_off = 0;

	if (ipv6_find_hdr(skb, &offset, IPPROTO_TCP, &frag_off, NULL) != IPPROTO_TCP ||
	    frag_off)
		return NF_ACCEPT;
	return verdict(is_marked_syn(skb, offset));
}
#endif

static const struct nf_hook_ops hooks[] = {
	{ .hook = sendsyn_v4, .pf = NFPROTO_IPV4, .hooknum = NF_INET_LOCAL_IN,
	  .priority = NF_IP_PRI_FIRST },
#if IS_ENABLED(CONFIG_IPV6)
	{ .hook = sendsyn_v6, .pf = NFPROTO_IPV6, .hooknum = NF_INET_LOCAL_IN,
	  .priority = NF_IP6_PRI_FIRST },
#endif
};

static int __net_init sendsyn_net_init(struct net *net)
{
	return nf_register_net_hooks(net, hooks, ARRAY_SIZE(hooks));
}

static void __net_exit sendsyn_net_exit(struct net *net)
{
	nf_unregister_net_hooks(net, hooks, ARRAY_SIZE(hooks));
}

static struct pernet_operations sendsyn_net_ops = {
	.init = sendsyn_net_init,
	.exit = sendsyn_net_exit,
};

int tcpsecrets_sendsyn_init(void)
{
	int err = register_pernet_subsys(&sendsyn_net_ops);

	if (err) {
		pr_err("cannot hook netfilter for SendSyn SYNs (error %d)\n", err);
		return err;
	}
	active = true;
	return 0;
}

void tcpsecrets_sendsyn_exit(void)
{
	if (!active)
		return;
	unregister_pernet_subsys(&sendsyn_net_ops);
	active = false;
}

u64 tcpsecrets_sendsyn_dropped(void)
{
	return atomic64_read(&dropped);
}

bool tcpsecrets_sendsyn_active(void)
{
	return active;
}
