// SPDX-License-Identifier: GPL-2.0
/*
 * /proc/tcp_secrets: the text of the tcpsecrets 2.4 module, kept for
 * consumers of that era (MITIGATOR v20.12 to v23.02). One `name value` pair
 * per line, all values from one snapshot:
 *   time_sec          CLOCK_REALTIME, seconds
 *   time_ms           CLOCK_REALTIME, milliseconds since the epoch
 *   uptime_ms         the TCP timestamp clock, ms (32 bits, as TSval)
 *   jiffies           the cookie clock in jiffies: count = jiffies / (60 * HZ)
 *   cookie_secret     both syncookie keys, 32 bytes in hex
 *   net_secret        16 bytes in hex
 *   timestamp_secret  the ts_secret that keys TS offsets, 16 bytes in hex
 *
 * Consumers of that era derive the cookie counter from `jiffies` and the TS
 * clock from `uptime_ms`. With cookie_clock=wall the kernel runs both on
 * wall time, so the text reports the clocks the kernel now uses:
 * jiffies = CLOCK_REALTIME in jiffies (its / (60 * HZ) is the wall-clock
 * counter) and uptime_ms = the TCP clock plus the wall-clock shift.
 */
#include "internal.h"

#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/string.h>

static void show_hex(struct seq_file *m, const char *name, const u8 *bytes,
		     size_t n)
{
	seq_printf(m, "%s %*phN\n", name, (int)n, bytes);
}

static int tcp_secrets_show(struct seq_file *m, void *v)
{
	struct tcpsecrets_snapshot snap;

	u64 jiffies64;

	tcpsecrets_take_snapshot(&snap);
	jiffies64 = snap.jiffies64;
	if (snap.cookie_clock == TCPSECRETS_CLOCK_WALL)
		jiffies64 = div_u64(snap.realtime_ns, NSEC_PER_SEC / HZ);

	seq_printf(m, "time_sec %llu\n", div_u64(snap.realtime_ns, NSEC_PER_SEC));
	seq_printf(m, "time_ms %llu\n", div_u64(snap.realtime_ns, NSEC_PER_MSEC));
	seq_printf(m, "uptime_ms %u\n", (u32)snap.tcp_clock_ms + snap.ts_shift_ms);
	seq_printf(m, "jiffies %llu\n", jiffies64);
	show_hex(m, "cookie_secret", snap.syncookie_secret,
		 sizeof(snap.syncookie_secret));
	show_hex(m, "net_secret", snap.net_secret, sizeof(snap.net_secret));
	show_hex(m, "timestamp_secret", snap.ts_secret, sizeof(snap.ts_secret));

	memzero_explicit(&snap, sizeof(snap));
	return 0;
}

static int tcp_secrets_open(struct inode *inode, struct file *file)
{
	if (!tcpsecrets_may_read())
		return -EACCES;
	return single_open(file, tcp_secrets_show, NULL);
}

/* The seq_file buffer holds secret text: wipe it before it is freed. */
static int tcp_secrets_release(struct inode *inode, struct file *file)
{
	struct seq_file *m = file->private_data;

	if (m && m->buf)
		memzero_explicit(m->buf, m->size);
	return single_release(inode, file);
}

static const struct proc_ops tcp_secrets_proc_ops = {
	.proc_open = tcp_secrets_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = tcp_secrets_release,
};

static struct proc_dir_entry *proc_entry;

int tcpsecrets_procfs_init(void)
{
	kgid_t group = tcpsecrets_read_group();

	proc_entry = proc_create(TCPSECRETS_PROC_NAME, gid_valid(group) ? 0440 : 0400,
				 NULL, &tcp_secrets_proc_ops);
	if (!proc_entry) {
		pr_err("cannot create /proc/%s\n", TCPSECRETS_PROC_NAME);
		return -ENOMEM;
	}
	if (gid_valid(group))
		proc_set_user(proc_entry, GLOBAL_ROOT_UID, group);
	return 0;
}

void tcpsecrets_procfs_exit(void)
{
	proc_remove(proc_entry);
	proc_entry = NULL;
}
