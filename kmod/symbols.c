// SPDX-License-Identifier: GPL-2.0
/*
 * Addresses of kernel symbols that are not exported (the secrets are static
 * variables). kallsyms_lookup_name() has not been exported since 5.7; a
 * kprobe registered on it reports its address, and that is all we use the
 * kprobe for.
 */
#include "internal.h"

#include <linux/kprobes.h>

static unsigned long (*lookup_name)(const char *name);

int tcpsecrets_symbols_init(void)
{
	struct kprobe probe = { .symbol_name = "kallsyms_lookup_name" };
	int err;

	err = register_kprobe(&probe);
	if (err) {
		pr_err("cannot locate kallsyms_lookup_name through a kprobe (error %d; needs CONFIG_KPROBES and CONFIG_KALLSYMS)\n",
		       err);
		return err;
	}
	lookup_name = (unsigned long (*)(const char *))probe.addr;
	unregister_kprobe(&probe);
	return 0;
}

/* Returns 0 when the kernel has no such symbol. */
unsigned long tcpsecrets_lookup(const char *name)
{
	return lookup_name ? lookup_name(name) : 0;
}
