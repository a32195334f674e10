// SPDX-License-Identifier: GPL-2.0
/*
 * tcpsecrets: export the kernel's TCP SYN-cookie secrets to the MITIGATOR
 * agent, run the kernel's cookies and timestamps on the clocks MITIGATOR
 * uses, accept cookies that MITIGATOR issued on this host's behalf, and drop
 * the SYNs it marks as its own.
 */
#include "internal.h"

#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/nsproxy.h>
#include <linux/sched.h>
#include <linux/user_namespace.h>
#include <net/net_namespace.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/rcupdate.h>
#include <linux/string.h>

static int read_gid = -1;
module_param(read_gid, int, 0444);
MODULE_PARM_DESC(read_gid,
		 "group (numeric gid) that may read /dev/tcpsecrets and /proc/tcp_secrets besides root; -1: root only");

static int write_gid = -1;
module_param(write_gid, int, 0444);
MODULE_PARM_DESC(write_gid,
		 "group (numeric gid) that may write a set (anycast secrets) to /dev/tcpsecrets besides root; -1: root only");

static bool accept_cookies = true;
module_param(accept_cookies, bool, 0444);
MODULE_PARM_DESC(accept_cookies,
		 "accept valid cookie ACKs for SYNs this host never answered when net.ipv4.tcp_syncookies=2 (default: yes)");

static char *cookie_clock = "wall";
module_param(cookie_clock, charp, 0444);
MODULE_PARM_DESC(cookie_clock,
		 "clock of the kernel's SYN cookies and TCP timestamps: wall (MITIGATOR v23.08+, default) or jiffies (the stock kernel's)");

static bool accept_all_netns = true;
module_param(accept_all_netns, bool, 0444);
MODULE_PARM_DESC(accept_all_netns,
		 "accept cookies in every network namespace (containers) while init_net's tcp_syncookies is 2, unless the namespace's is 0 (default: yes)");

static bool drop_sendsyn = true;
module_param(drop_sendsyn, bool, 0444);
MODULE_PARM_DESC(drop_sendsyn,
		 "drop SYNs carrying MITIGATOR's SendSyn marker (urgent pointer bytes 00 01) (default: yes)");

static kgid_t read_group = INVALID_GID;
static kgid_t write_group = INVALID_GID;

kgid_t tcpsecrets_read_group(void)
{
	return read_group;
}

kgid_t tcpsecrets_write_group(void)
{
	return write_group;
}

/*
 * The secrets belong to the host: a reader or writer must be in the initial
 * network and user namespaces (no container, not even a root one), and root
 * must hold CAP_NET_ADMIN there (a capability-less root is refused); members
 * of the configured group need no capability.
 */
static bool root_or_member(kgid_t group)
{
	if (current->nsproxy->net_ns != &init_net || current_user_ns() != &init_user_ns)
		return false;
	if (uid_eq(current_fsuid(), GLOBAL_ROOT_UID) && capable(CAP_NET_ADMIN))
		return true;
	return gid_valid(group) && in_group_p(group);
}

/* Root with CAP_NET_ADMIN, or a member of the configured group, on the host. */
bool tcpsecrets_may_read(void)
{
	return root_or_member(read_group);
}

bool tcpsecrets_may_write(void)
{
	return root_or_member(write_group);
}

static int parse_gid(const char *name, int value, kgid_t *group)
{
	if (value == -1)
		return 0;
	*group = make_kgid(&init_user_ns, value);
	if (value < 0 || !gid_valid(*group)) {
		pr_err("%s=%d is not a valid group id\n", name, value);
		return -EINVAL;
	}
	return 0;
}

static int parse_clock(bool *wall)
{
	if (!strcmp(cookie_clock, "wall"))
		*wall = true;
	else if (!strcmp(cookie_clock, "jiffies"))
		*wall = false;
	else {
		pr_err("cookie_clock=%s is not wall or jiffies\n", cookie_clock);
		return -EINVAL;
	}
	return 0;
}

static int __init tcpsecrets_init(void)
{
	bool wall;
	int err;

	err = parse_gid("read_gid", read_gid, &read_group);
	if (!err)
		err = parse_gid("write_gid", write_gid, &write_group);
	if (!err)
		err = parse_clock(&wall);
	if (err)
		return err;

	err = tcpsecrets_secrets_init();
	if (err)
		return err;
	err = tcpsecrets_ts_offset_init(tcpsecrets_kernel_ts_secret(), wall);
	if (err)
		return err;
	err = tcpsecrets_cookie_clock_init(wall);
	if (err)
		goto err_ts_offset;
	err = tcpsecrets_netns_init(accept_all_netns);
	if (err)
		goto err_cookie_clock;
	if (accept_cookies) {
		err = tcpsecrets_cookie_accept_init();
		if (err)
			goto err_netns;
	}
	if (drop_sendsyn) {
		err = tcpsecrets_sendsyn_init();
		if (err)
			goto err_cookie_accept;
	}
	err = tcpsecrets_procfs_init();
	if (err)
		goto err_sendsyn;
	err = tcpsecrets_chardev_init();
	if (err)
		goto err_procfs;
	/* Every redirect is on and behaves as the kernel: now ours take over at once. */
	tcpsecrets_handover_to_module();

	pr_info("version %s loaded (ABI %d, cookie clock %s, cookie accept %s%s, SendSyn drop %s, reader gid %d, writer gid %d)\n",
		TCPSECRETS_VERSION, TCPSECRETS_ABI_VERSION, wall ? "wall" : "jiffies",
		tcpsecrets_cookie_accept_active() ? "on" : "off",
		accept_all_netns ? " in every netns" : "",
		tcpsecrets_sendsyn_active() ? "on" : "off", read_gid, write_gid);
	return 0;

err_procfs:
	tcpsecrets_procfs_exit();
err_sendsyn:
	tcpsecrets_sendsyn_exit();
err_cookie_accept:
	tcpsecrets_cookie_accept_exit();
err_netns:
	tcpsecrets_netns_exit();
err_cookie_clock:
	tcpsecrets_cookie_clock_exit();
err_ts_offset:
	tcpsecrets_ts_offset_exit();
	/* A task may still be inside one of our replacements: let it leave. */
	synchronize_rcu_tasks();
	return err;
}

static void __exit tcpsecrets_exit(void)
{
	/* Back to the kernel's cookies and offsets first, so that removing the redirects changes nothing. */
	tcpsecrets_handover_to_kernel();
	tcpsecrets_chardev_exit();
	tcpsecrets_procfs_exit();
	tcpsecrets_sendsyn_exit();
	tcpsecrets_cookie_accept_exit();
	tcpsecrets_netns_exit();
	tcpsecrets_cookie_clock_exit();
	tcpsecrets_ts_offset_exit();
	/*
	 * The redirects are off, but a task preempted inside one of our
	 * replacements (secure_tcp_seq_and_ts_off runs in process context)
	 * would resume in freed code: wait until every task has scheduled
	 * voluntarily, which it cannot do in there.
	 */
	synchronize_rcu_tasks();
}

module_init(tcpsecrets_init);
module_exit(tcpsecrets_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Exports the TCP SYN-cookie secrets, runs cookies on wall time, and accepts cookies issued upstream (MITIGATOR)");
MODULE_VERSION(TCPSECRETS_VERSION);
