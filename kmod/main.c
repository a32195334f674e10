// SPDX-License-Identifier: GPL-2.0
/*
 * tcpsecrets: export the kernel's TCP SYN-cookie secrets to the MITIGATOR
 * agent, and accept cookies that MITIGATOR issued on this host's behalf.
 */
#include "internal.h"

#include <linux/cred.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

static int read_gid = -1;
module_param(read_gid, int, 0444);
MODULE_PARM_DESC(read_gid,
		 "group (numeric gid) that may read /dev/tcpsecrets and /proc/tcp_secrets besides root; -1: root only");

static bool accept_cookies = true;
module_param(accept_cookies, bool, 0444);
MODULE_PARM_DESC(accept_cookies,
		 "accept valid cookie ACKs for SYNs this host never answered when net.ipv4.tcp_syncookies=2 (default: yes)");

static kgid_t read_group = INVALID_GID;

kgid_t tcpsecrets_read_group(void)
{
	return read_group;
}

/* Global root, or a member of the configured group. */
bool tcpsecrets_may_read(void)
{
	if (uid_eq(current_fsuid(), GLOBAL_ROOT_UID))
		return true;
	return gid_valid(read_group) && in_group_p(read_group);
}

static int __init tcpsecrets_init(void)
{
	int err;

	if (read_gid != -1) {
		read_group = make_kgid(&init_user_ns, read_gid);
		if (read_gid < 0 || !gid_valid(read_group)) {
			pr_err("read_gid=%d is not a valid group id\n", read_gid);
			return -EINVAL;
		}
	}

	err = tcpsecrets_symbols_init();
	if (err)
		return err;
	err = tcpsecrets_secrets_init();
	if (err)
		return err;
	if (accept_cookies) {
		err = tcpsecrets_cookie_accept_init();
		if (err)
			return err;
	}
	err = tcpsecrets_procfs_init();
	if (err)
		goto err_cookie_accept;
	err = tcpsecrets_chardev_init();
	if (err)
		goto err_procfs;

	pr_info("version %s loaded (ABI %d, cookie accept %s, reader gid %d)\n",
		TCPSECRETS_VERSION, TCPSECRETS_ABI_VERSION,
		tcpsecrets_cookie_accept_active() ? "on" : "off", read_gid);
	return 0;

err_procfs:
	tcpsecrets_procfs_exit();
err_cookie_accept:
	tcpsecrets_cookie_accept_exit();
	return err;
}

static void __exit tcpsecrets_exit(void)
{
	tcpsecrets_chardev_exit();
	tcpsecrets_procfs_exit();
	tcpsecrets_cookie_accept_exit();
}

module_init(tcpsecrets_init);
module_exit(tcpsecrets_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Exports the TCP SYN-cookie secrets and accepts cookies issued upstream (MITIGATOR)");
MODULE_VERSION(TCPSECRETS_VERSION);
