// SPDX-License-Identifier: GPL-2.0
/*
 * Make a kernel function resume in one of ours, as livepatch does: an ftrace
 * callback at the function's entry changes the address the trampoline
 * returns to. The kernel's function body never runs while the redirect is
 * on, and the replacement never calls it, so there is no recursion and no
 * indirect call into kernel text (IBT-safe): the trampoline's return is the
 * only transfer, and it lands on our ENDBR-marked function.
 *
 * Only one IPMODIFY user may own a function: a livepatch of the same
 * function makes registration fail (-EBUSY), and the load fails with it.
 */
#include "internal.h"

#include <linux/ftrace.h>
#include <linux/kernel.h>

#include "compat.h"

#define ENDBR_SIZE 4	/* endbr64: f3 0f 1e fa */

static void notrace redirect_callback(unsigned long ip, unsigned long parent_ip,
				      struct ftrace_ops *ops,
				      compat_ftrace_regs_t *regs)
{
	struct tcpsecrets_redirect *r =
		container_of(ops, struct tcpsecrets_redirect, ops);

	compat_ftrace_resume_at(regs, r->to);
}

int tcpsecrets_redirect_on(struct tcpsecrets_redirect *r)
{
	int err;

	if (!r->from)
		r->from = tcpsecrets_lookup_function(r->name);
	if (!r->from) {
		pr_err("kernel function %s not found\n", r->name);
		return -ENOENT;
	}
	r->ops.func = redirect_callback;
	r->ops.flags = COMPAT_FTRACE_REDIRECT_FLAGS;

	/*
	 * The ftrace call site is the function's first instruction, or the
	 * one after ENDBR64 on kernels built for IBT; ftrace accepts only the
	 * site itself (newer kernels map the start to it on their own).
	 */
	r->site = r->from;
	err = ftrace_set_filter_ip(&r->ops, r->site, 0, 0);
	if (err) {
		r->site = r->from + ENDBR_SIZE;
		err = ftrace_set_filter_ip(&r->ops, r->site, 0, 0);
	}
	if (err) {
		pr_err("cannot set an ftrace filter on %s (error %d; needs CONFIG_DYNAMIC_FTRACE)\n",
		       r->name, err);
		return err;
	}
	err = register_ftrace_function(&r->ops);
	if (err) {
		pr_err("cannot redirect %s (ftrace error %d; is it livepatched?)\n",
		       r->name, err);
		goto err_filter;
	}
	r->on = true;
	return 0;

err_filter:
	ftrace_set_filter_ip(&r->ops, r->site, 1, 0);
	return err;
}

void tcpsecrets_redirect_off(struct tcpsecrets_redirect *r)
{
	if (!r->on)
		return;
	/* Returns once no CPU can still be inside our callback. */
	WARN_ON(unregister_ftrace_function(&r->ops));
	WARN_ON(ftrace_set_filter_ip(&r->ops, r->site, 1, 0));
	r->on = false;
}

int tcpsecrets_redirects_on(struct tcpsecrets_redirect *list, int n)
{
	int i, err;

	for (i = 0; i < n; i++) {
		err = tcpsecrets_redirect_on(&list[i]);
		if (err)
			goto unwind;
	}
	return 0;

unwind:
	while (--i >= 0)
		tcpsecrets_redirect_off(&list[i]);
	return err;
}

void tcpsecrets_redirects_off(struct tcpsecrets_redirect *list, int n)
{
	int i;

	for (i = n - 1; i >= 0; i--)
		tcpsecrets_redirect_off(&list[i]);
}
