// SPDX-License-Identifier: GPL-2.0
/*
 * Accept cookie ACKs for SYNs this host never answered.
 *
 * When MITIGATOR answers a SYN flood with cookies made from our secrets, the
 * client's ACK reaches a listener that sent nothing. cookie_v{4,6}_check()
 * then refuse it: they only check cookies on a listener that recorded a
 * SYN-queue overflow in the last two minutes (tcp_synq_no_recent_overflow()),
 * a guard against brute-forcing cookies on a host that is not sending any.
 *
 * With net.ipv4.tcp_syncookies=2 the administrator has told the kernel to
 * answer every SYN with a cookie, so a cookie may legitimately arrive at any
 * time. A kprobe at the entry of each check records an overflow for the
 * listener in that case -- tcp_synq_overflow(), exactly what the kernel does
 * itself whenever it sends a cookie -- and the kernel's own code then
 * validates the cookie as usual.
 *
 * Which listeners: those whose network namespace accepts cookies (netns.c:
 * its own tcp_syncookies is 2, or, with accept_all_netns, the host's is 2
 * and the namespace's is not 0). Elsewhere nothing changes, but a valid
 * cookie arriving at a listener that will refuse it is counted for that
 * namespace, so that lost cookies do not go unseen.
 */
#include "internal.h"

#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/kprobes.h>
#include <linux/skbuff.h>
#include <linux/tcp.h>
#include <net/sock.h>
#include <net/tcp.h>

#include "compat.h"

static bool is_plain_ack(const struct tcphdr *th)
{
	return th->ack && !th->syn && !th->rst;
}

/* Whether the ACK holds a cookie the kernel would take (switch: no indirect call). */
static bool holds_cookie(const struct sk_buff *skb, int family)
{
	if (!is_plain_ack(tcp_hdr(skb)))
		return false;
	switch (family) {
	case AF_INET:
		return tcpsecrets_cookie_mss_v4(ip_hdr(skb), tcp_hdr(skb)) != 0;
#if IS_ENABLED(CONFIG_IPV6)
	case AF_INET6:
		return tcpsecrets_cookie_mss_v6(ipv6_hdr(skb), tcp_hdr(skb)) != 0;
#endif
	}
	return false;
}

/* cookie_v{4,6}_check(sk, skb): from the TCP receive path, under RCU. */
static void cookie_check_entry(struct pt_regs *regs, int family)
{
	struct sock *sk = (struct sock *)compat_kprobe_arg0(regs);
	const struct sk_buff *skb = (const struct sk_buff *)compat_kprobe_arg1(regs);

	if (!sk || sk->sk_state != TCP_LISTEN)
		return;
	if (tcpsecrets_netns_accepts(sock_net(sk)))
		tcp_synq_overflow(sk);
	else if (tcp_synq_no_recent_overflow(sk) && holds_cookie(skb, family))
		tcpsecrets_netns_count_refused(sock_net(sk));
}

static int cookie_check_v4_entry(struct kprobe *probe, struct pt_regs *regs)
{
	cookie_check_entry(regs, AF_INET);
	return 0;
}

static struct kprobe cookie_check_v4 = {
	.symbol_name = "cookie_v4_check",
	.pre_handler = cookie_check_v4_entry,
};

#if IS_ENABLED(CONFIG_IPV6)
static int cookie_check_v6_entry(struct kprobe *probe, struct pt_regs *regs)
{
	cookie_check_entry(regs, AF_INET6);
	return 0;
}

static struct kprobe cookie_check_v6 = {
	.symbol_name = "cookie_v6_check",
	.pre_handler = cookie_check_v6_entry,
};
#endif

static struct kprobe *probes[] = {
	&cookie_check_v4,
#if IS_ENABLED(CONFIG_IPV6)
	&cookie_check_v6,
#endif
};

static bool active;

int tcpsecrets_cookie_accept_init(void)
{
	int i, err;

	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		err = register_kprobe(probes[i]);
		if (err) {
			pr_err("cannot hook %s (kprobe error %d)\n",
			       probes[i]->symbol_name, err);
			goto unwind;
		}
	}
	active = true;
	return 0;

unwind:
	while (--i >= 0)
		unregister_kprobe(probes[i]);
	return err;
}

void tcpsecrets_cookie_accept_exit(void)
{
	int i;

	if (!active)
		return;
	for (i = ARRAY_SIZE(probes) - 1; i >= 0; i--)
		unregister_kprobe(probes[i]);
	active = false;
}

bool tcpsecrets_cookie_accept_active(void)
{
	return active;
}
