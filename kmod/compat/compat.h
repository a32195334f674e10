/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The one place where kernels differ. probe.sh looks at the headers being
 * built against and passes TCPSECRETS_HAVE_* flags; this file turns them
 * into named helpers so the rest of the module has no version checks.
 */
#ifndef TCPSECRETS_COMPAT_H
#define TCPSECRETS_COMPAT_H

#include <linux/kprobes.h>
#include <linux/ptrace.h>
#include <linux/proc_fs.h>
#include <net/secure_seq.h>

/* Supported edges: hard errors, each naming what is missing. */
#ifndef CONFIG_SYN_COOKIES
#error "tcpsecrets needs a kernel with CONFIG_SYN_COOKIES=y"
#endif
#ifndef CONFIG_KPROBES
#error "tcpsecrets needs a kernel with CONFIG_KPROBES=y (symbol lookup and the cookie hook)"
#endif
#ifndef CONFIG_KALLSYMS_ALL
#error "tcpsecrets needs a kernel with CONFIG_KALLSYMS_ALL=y (the secrets are static variables)"
#endif
#ifndef TCPSECRETS_HAVE_PROC_OPS
#error "tcpsecrets needs Linux 5.6 or newer (struct proc_ops)"
#endif
#if !defined(TCPSECRETS_HAVE_SEQ_AND_TS_OFF) && !defined(TCPSECRETS_HAVE_TS_OFF)
#error "tcpsecrets does not know this kernel's ISN/timestamp-offset scheme (include/net/secure_seq.h)"
#endif
#if !defined(CONFIG_X86_64)
#error "tcpsecrets is built and tested for x86_64 only"
#endif

/* First argument of a probed function, at its entry. */
static inline unsigned long compat_kprobe_arg0(struct pt_regs *regs)
{
	return regs_get_kernel_argument(regs, 0);
}

#ifdef TCPSECRETS_HAVE_SEQ_AND_TS_OFF
/* net_secret keys both the ISN and the TS offset; there is no ts_secret. */
#define COMPAT_HAS_TS_SECRET 0
static inline void compat_force_ts_secret(void)
{
}
#else
/* ts_secret exists; the exported IPv6 helper creates it on first use, but
 * only while net.ipv4.tcp_timestamps is 1 (it returns early otherwise). */
#define COMPAT_HAS_TS_SECRET 1
static inline void compat_force_ts_secret(void)
{
	static const __be32 any[4];

	secure_tcpv6_ts_off(&init_net, any, any);
}
#endif

#endif /* TCPSECRETS_COMPAT_H */
