/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The one place where kernels differ. probe.sh looks at the headers being
 * built against and passes TCPSECRETS_HAVE_* flags; this file turns them
 * into named helpers so the rest of the module has no version checks.
 */
#ifndef TCPSECRETS_COMPAT_H
#define TCPSECRETS_COMPAT_H

#include <linux/ftrace.h>
#include <linux/kprobes.h>
#include <linux/ptrace.h>
#include <linux/proc_fs.h>
#include <net/net_namespace.h>
#include <linux/siphash.h>
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
#ifndef CONFIG_DYNAMIC_FTRACE_WITH_REGS
#if !defined(CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS) || !defined(CONFIG_DYNAMIC_FTRACE)
#error "tcpsecrets needs a kernel with CONFIG_DYNAMIC_FTRACE_WITH_REGS or _WITH_ARGS (the cookie clock)"
#endif
#endif
#if !defined(CONFIG_X86_64)
#error "tcpsecrets is built and tested for x86_64 only"
#endif

/* The kernel's aligned SipHash key type, where its headers lack the name. */
#ifndef TCPSECRETS_HAVE_SIPHASH_ALIGNED_KEY
#define siphash_aligned_key_t siphash_key_t __aligned(16)
#endif

/* Arguments of a probed function, at its entry. */
static inline unsigned long compat_kprobe_arg0(struct pt_regs *regs)
{
	return regs_get_kernel_argument(regs, 0);
}

static inline unsigned long compat_kprobe_arg1(struct pt_regs *regs)
{
	return regs_get_kernel_argument(regs, 1);
}

/*
 * ftrace callbacks, and how one makes the traced function resume in another
 * (what livepatch does): with ftrace_regs only the saved arguments and the
 * resume address exist, without it the callback asks for full pt_regs.
 */
#ifdef TCPSECRETS_HAVE_FTRACE_REGS
typedef struct ftrace_regs compat_ftrace_regs_t;
#ifdef TCPSECRETS_HAVE_FTRACE_REGS_SET_IP
#define compat_ftrace_resume_at(fregs, ip) ftrace_regs_set_instruction_pointer(fregs, ip)
#else
#define compat_ftrace_resume_at(fregs, ip) ftrace_instruction_pointer_set(fregs, ip)
#endif
#else
typedef struct pt_regs compat_ftrace_regs_t;
#define compat_ftrace_resume_at(regs, addr) ((regs)->ip = (addr))
#endif

#ifdef CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS
#define COMPAT_FTRACE_REDIRECT_FLAGS FTRACE_OPS_FL_IPMODIFY
#else
#define COMPAT_FTRACE_REDIRECT_FLAGS (FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_SAVE_REGS)
#endif

/*
 * __cookie_v{4,6}_check(): the cookie is an argument, or (6.8+) the
 * function reads it from the ACK (ack_seq - 1). COMPAT_COOKIE_CHECK_PARAMS
 * declares the parameters, compat_cookie_of() yields the cookie either way.
 */
#ifdef TCPSECRETS_HAVE_COOKIE_CHECK_COOKIE_ARG
#define COMPAT_COOKIE_CHECK_PARAMS(iphdr_type) \
	const iphdr_type *iph, const struct tcphdr *th, u32 cookie
#define compat_cookie_of(th) (cookie)
#define compat_call_cookie_check(fn, iph, th, cookie) fn(iph, th, cookie)
#else
#define COMPAT_COOKIE_CHECK_PARAMS(iphdr_type) \
	const iphdr_type *iph, const struct tcphdr *th
#define compat_cookie_of(th) (ntohl((th)->ack_seq) - 1)
#define compat_call_cookie_check(fn, iph, th, cookie) fn(iph, th)
#endif

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
