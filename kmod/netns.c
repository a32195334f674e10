// SPDX-License-Identifier: GPL-2.0
/*
 * Network namespaces: where cookies are accepted, and where they are lost.
 *
 * net.ipv4.tcp_syncookies is per namespace, and a fresh namespace (every
 * container) starts at 1, whatever the host has. The secrets and the clock
 * are global, so a listener in a container makes and checks the very cookies
 * MITIGATOR computes; only acceptance differs. Policy (cookie_accept.c):
 *   - the namespace's own tcp_syncookies is 2: accepted;
 *   - accept_all_netns (default on) and init_net is at 2: accepted unless
 *     the namespace itself is at 0 (an explicit opt-out);
 *   - otherwise refused, and counted here when the ACK held a cookie that
 *     was valid, so that the admin learns which namespaces lose
 *     MITIGATOR's cookies.
 * /proc/tcpsecrets_netns lists every namespace, one line each:
 *   netns INUM syncookies N accepts yes|no refused COUNT
 * INUM is the namespace's inode (what `readlink /proc/PID/ns/net` shows as
 * net:[INUM]). It is readable by whoever may read the secrets.
 */
#include "internal.h"

#include <linux/atomic.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>

#define NETNS_PROC_NAME "tcpsecrets_netns"

struct netns_state {
	struct list_head node;
	struct net *net;
	atomic64_t refused;
};

static unsigned int netns_id;
static LIST_HEAD(namespaces);	/* every netns_state, under namespaces_lock */
static DEFINE_MUTEX(namespaces_lock);
static atomic64_t refused_total = ATOMIC64_INIT(0);
static bool accept_all;
static struct proc_dir_entry *proc_entry;

static int __net_init netns_init(struct net *net)
{
	struct netns_state *state = net_generic(net, netns_id);

	state->net = net;
	atomic64_set(&state->refused, 0);
	mutex_lock(&namespaces_lock);
	list_add_tail(&state->node, &namespaces);
	mutex_unlock(&namespaces_lock);
	return 0;
}

static void __net_exit netns_exit(struct net *net)
{
	struct netns_state *state = net_generic(net, netns_id);

	mutex_lock(&namespaces_lock);
	list_del(&state->node);
	mutex_unlock(&namespaces_lock);
}

static struct pernet_operations netns_ops = {
	.init = netns_init,
	.exit = netns_exit,
	.id = &netns_id,
	.size = sizeof(struct netns_state),
};

static int syncookies_of(const struct net *net)
{
	return READ_ONCE(net->ipv4.sysctl_tcp_syncookies);
}

bool tcpsecrets_netns_accepts(const struct net *net)
{
	int own = syncookies_of(net);

	if (own == 2)
		return true;
	return accept_all && own != 0 && syncookies_of(&init_net) == 2;
}

/* A valid cookie reached a listener in `net` that refuses it. */
void tcpsecrets_netns_count_refused(struct net *net)
{
	struct netns_state *state = net_generic(net, netns_id);

	atomic64_inc(&state->refused);
	atomic64_inc(&refused_total);
}

u64 tcpsecrets_netns_refused_total(void)
{
	return atomic64_read(&refused_total);
}

bool tcpsecrets_netns_accept_all(void)
{
	return accept_all;
}

/* How many namespaces would refuse MITIGATOR's cookies right now. */
u32 tcpsecrets_netns_refusing(void)
{
	struct netns_state *state;
	u32 n = 0;

	mutex_lock(&namespaces_lock);
	list_for_each_entry(state, &namespaces, node)
		n += !tcpsecrets_netns_accepts(state->net);
	mutex_unlock(&namespaces_lock);
	return n;
}

static int netns_show(struct seq_file *m, void *v)
{
	struct netns_state *state;

	mutex_lock(&namespaces_lock);
	list_for_each_entry(state, &namespaces, node)
		seq_printf(m, "netns %u syncookies %d accepts %s refused %llu\n",
			   state->net->ns.inum, syncookies_of(state->net),
			   tcpsecrets_netns_accepts(state->net) ? "yes" : "no",
			   (unsigned long long)atomic64_read(&state->refused));
	mutex_unlock(&namespaces_lock);
	return 0;
}

static int netns_open(struct inode *inode, struct file *file)
{
	if (!tcpsecrets_may_read())
		return -EACCES;
	return single_open(file, netns_show, NULL);
}

static const struct proc_ops netns_proc_ops = {
	.proc_open = netns_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
};

int tcpsecrets_netns_init(bool accept_all_netns)
{
	kgid_t group = tcpsecrets_read_group();
	int err;

	accept_all = accept_all_netns;
	err = register_pernet_subsys(&netns_ops);
	if (err) {
		pr_err("cannot track network namespaces (error %d)\n", err);
		return err;
	}
	proc_entry = proc_create(NETNS_PROC_NAME, gid_valid(group) ? 0440 : 0400, NULL,
				 &netns_proc_ops);
	if (!proc_entry) {
		pr_err("cannot create /proc/%s\n", NETNS_PROC_NAME);
		unregister_pernet_subsys(&netns_ops);
		return -ENOMEM;
	}
	if (gid_valid(group))
		proc_set_user(proc_entry, GLOBAL_ROOT_UID, group);
	return 0;
}

void tcpsecrets_netns_exit(void)
{
	proc_remove(proc_entry);
	proc_entry = NULL;
	unregister_pernet_subsys(&netns_ops);
}
