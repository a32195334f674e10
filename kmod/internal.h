/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between the module's files; each .c includes this first. */
#ifndef TCPSECRETS_INTERNAL_H
#define TCPSECRETS_INTERNAL_H

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/types.h>
#include <linux/uidgid.h>
#include <uapi/tcpsecrets.h>

#define TCPSECRETS_PROC_NAME "tcp_secrets"

/* symbols.c: addresses of kernel symbols that are not exported */
int tcpsecrets_symbols_init(void);
unsigned long tcpsecrets_lookup(const char *name);

/* secrets.c: where the kernel keeps its secrets, and the snapshot */
int tcpsecrets_secrets_init(void);
void tcpsecrets_take_snapshot(struct tcpsecrets_snapshot *snap);

/* main.c: who may read secrets besides root */
bool tcpsecrets_may_read(void);
kgid_t tcpsecrets_read_group(void);

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
