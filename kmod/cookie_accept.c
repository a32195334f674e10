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
 * validates the cookie as usual. Nothing else changes: with any other
 * tcp_syncookies value the probe does nothing.
 */
#include "internal.h"

#include <linux/kprobes.h>
#include <net/sock.h>
#include <net/tcp.h>

#include "compat.h"

static int cookie_check_entry(struct kprobe *probe, struct pt_regs *regs)
{
	struct sock *sk = (struct sock *)compat_kprobe_arg0(regs);

	/* Called from the TCP receive path, under rcu_read_lock(). */
	if (sk && sk->sk_state == TCP_LISTEN &&
	    READ_ONCE(sock_net(sk)->ipv4.sysctl_tcp_syncookies) == 2)
		tcp_synq_overflow(sk);
	return 0;
}

static struct kprobe cookie_check_v4 = {
	.symbol_name = "cookie_v4_check",
	.pre_handler = cookie_check_entry,
};

#if IS_ENABLED(CONFIG_IPV6)
static struct kprobe cookie_check_v6 = {
	.symbol_name = "cookie_v6_check",
	.pre_handler = cookie_check_entry,
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
