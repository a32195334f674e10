/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between the module's files; each .c includes this first. */
#ifndef TCPSECRETS_INTERNAL_H
#define TCPSECRETS_INTERNAL_H

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/ftrace.h>
#include <linux/siphash.h>
#include <linux/types.h>
#include <linux/uidgid.h>

struct net;
#include <uapi/tcpsecrets.h>

#define TCPSECRETS_PROC_NAME "tcp_secrets"

/* symbols.c: addresses of kernel symbols that are not exported */
unsigned long tcpsecrets_lookup(const char *name);
unsigned long tcpsecrets_lookup_function(const char *name);

/* secrets.c: where the kernel keeps its secrets, the snapshot, and `set` */
int tcpsecrets_secrets_init(void);
void tcpsecrets_take_snapshot(struct tcpsecrets_snapshot *snap);
int tcpsecrets_apply_set(const struct tcpsecrets_set *set);
/* The kernel's syncookie keys (IPv4, IPv6: [0] and [1]) and net_secret. */
const siphash_key_t *tcpsecrets_syncookie_keys(int family);
const siphash_key_t *tcpsecrets_net_secret(void);
const siphash_key_t *tcpsecrets_kernel_ts_secret(void);

/* redirect.c: make a kernel function resume in one of ours (ftrace) */
struct tcpsecrets_redirect {
	const char *name;
	unsigned long from;	/* the kernel function */
	unsigned long to;	/* ours, with the same signature */
	unsigned long site;	/* its ftrace call site */
	struct ftrace_ops ops;
	bool on;
};
int tcpsecrets_redirect_on(struct tcpsecrets_redirect *r);
void tcpsecrets_redirect_off(struct tcpsecrets_redirect *r);
int tcpsecrets_redirects_on(struct tcpsecrets_redirect *list, int n);
void tcpsecrets_redirects_off(struct tcpsecrets_redirect *list, int n);

/* handover.c: handshakes in flight across a load or an unload */
#define TCPSECRETS_ERA_KERNEL 0	/* what the kernel does without us */
#define TCPSECRETS_ERA_MODULE 1	/* ours */
int tcpsecrets_era_making(void);
int tcpsecrets_eras_to_check(int *other);	/* other: the other era, or -1 */
void tcpsecrets_era_used(int era);
void tcpsecrets_era_checked(int family, const __be32 *server, const __be32 *client,
			    __be16 server_port, __be16 client_port, int era);
int tcpsecrets_era_for(int family, const __be32 *server, const __be32 *client,
		       __be16 server_port, __be16 client_port);
void tcpsecrets_handover_to_module(void);
void tcpsecrets_handover_to_kernel(void);	/* may sleep HANDOVER_UNLOAD_MS */

/* cookie_clock.c: the kernel's SYN cookies on wall-clock minutes */
int tcpsecrets_cookie_clock_init(bool wall);
void tcpsecrets_cookie_clock_exit(void);
bool tcpsecrets_cookie_clock_wall(void);
u32 tcpsecrets_cookie_count(u64 realtime_ns, u64 jiffies64);
struct iphdr;
struct ipv6hdr;
struct tcphdr;
int tcpsecrets_cookie_mss_v4(const struct iphdr *iph, const struct tcphdr *ack);
int tcpsecrets_cookie_mss_v6(const struct ipv6hdr *iph, const struct tcphdr *ack);

/* ts_offset.c: TCP timestamp offsets from the module's ts_secret */
int tcpsecrets_ts_offset_init(const siphash_key_t *kernel_ts_secret, bool wall);
void tcpsecrets_ts_offset_exit(void);
u32 tcpsecrets_ts_shift(u64 realtime_ns, u64 tcp_clock_ns);
u32 tcpsecrets_ts_shift_now(void);
void tcpsecrets_ts_secret_read(siphash_key_t *out);
void tcpsecrets_ts_secret_write(const siphash_key_t *in);	/* under stop_machine */

/* netns.c: per-namespace cookie acceptance and refusals */
int tcpsecrets_netns_init(bool accept_all_netns);
void tcpsecrets_netns_exit(void);
bool tcpsecrets_netns_accepts(const struct net *net);
void tcpsecrets_netns_count_refused(struct net *net);
u64 tcpsecrets_netns_refused_total(void);
u32 tcpsecrets_netns_refusing(void);
bool tcpsecrets_netns_accept_all(void);

/* sendsyn.c: drop SYNs carrying MITIGATOR's SendSyn marker */
int tcpsecrets_sendsyn_init(void);
void tcpsecrets_sendsyn_exit(void);
u64 tcpsecrets_sendsyn_dropped(void);
bool tcpsecrets_sendsyn_active(void);

/* main.c: who may read secrets besides root, and who may `set` them */
bool tcpsecrets_may_read(void);
bool tcpsecrets_may_write(void);
kgid_t tcpsecrets_read_group(void);
kgid_t tcpsecrets_write_group(void);

/* chardev.c, procfs.c: the two ways out */
int tcpsecrets_chardev_init(void);
void tcpsecrets_chardev_exit(void);
int tcpsecrets_procfs_init(void);
void tcpsecrets_procfs_exit(void);

/* cookie_accept.c: accept cookies issued upstream when tcp_syncookies=2 */
int tcpsecrets_cookie_accept_init(void);
void tcpsecrets_cookie_accept_exit(void);
bool tcpsecrets_cookie_accept_active(void);

#endif /* TCPSECRETS_INTERNAL_H */
