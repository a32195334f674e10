// SPDX-License-Identifier: GPL-2.0
/*
 * Addresses of kernel symbols that are not exported (the secrets are static
 * variables), found without calling into kernel text through a pointer.
 *
 * kallsyms_lookup_name() is not exported since 5.7, and calling it through
 * the address a kprobe reports is an indirect call to a function the kernel
 * may have sealed against them (CET/IBT: its ENDBR is gone when nothing in
 * vmlinux takes its address), which faults on IBT hardware. So the kprobe
 * machinery does the lookup itself:
 *  - registering a kprobe on a data symbol resolves the name and then fails
 *    (-EINVAL: not text) with .addr set; an unknown name gives -ENOENT;
 *  - registering one on a function succeeds with .addr at the probe point
 *    (the function's start, or its ftrace site just past ENDBR).
 * Every address is then checked with sprint_symbol(): it must be the start
 * of the symbol asked for (or, for a function, within its first 16 bytes),
 * in vmlinux, not in a module (ours included: its symbols are visible too).
 */
#include "internal.h"

#include <linux/kallsyms.h>
#include <linux/kprobes.h>
#include <linux/string.h>

/* Bytes a probe point may sit past a function's start (ENDBR64 is 4). */
#define MAX_ENTRY_OFFSET 16

/* sprint_symbol() gives "name+0xoff/0xsize"; split it and check the name. */
static bool symbol_is(unsigned long addr, const char *name, unsigned long max_off)
{
	char found[KSYM_SYMBOL_LEN];
	size_t len = strlen(name);
	unsigned long off;

	sprint_symbol(found, addr);
	if (strncmp(found, name, len) || found[len] != '+')
		return false;
	if (strchr(found, '['))
		return false;	/* "name+0x0/0x10 [module]": not the kernel's */
	if (sscanf(found + len + 1, "0x%lx/", &off) != 1)
		return false;
	return off <= max_off;
}

static unsigned long resolve(const char *name, bool function)
{
	struct kprobe probe = { .symbol_name = name };
	unsigned long addr;
	int err;

	err = register_kprobe(&probe);
	if (!err)
		unregister_kprobe(&probe);
	addr = (unsigned long)probe.addr;
	if (!addr || err == -ENOENT)
		return 0;
	if ((function && err) || (!function && !err)) {
		pr_err("kernel symbol %s is not a %s (kprobe said %d)\n", name,
		       function ? "function" : "variable", err);
		return 0;
	}
	if (!symbol_is(addr, name, function ? MAX_ENTRY_OFFSET : 0)) {
		pr_err("kernel symbol %s resolved to %pS, not to itself; not used\n",
		       name, (void *)addr);
		return 0;
	}
	return addr;
}

/* A kernel variable's address; 0 when the kernel has no such symbol. */
unsigned long tcpsecrets_lookup(const char *name)
{
	return resolve(name, false);
}

/* An address inside a kernel function's entry (for ftrace_location()). */
unsigned long tcpsecrets_lookup_function(const char *name)
{
	return resolve(name, true);
}
