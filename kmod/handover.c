// SPDX-License-Identifier: GPL-2.0
/*
 * Handshakes in flight across a load or an unload of the module.
 *
 * The module changes two things a cookie handshake depends on: the counter
 * of the cookie (wall-clock minutes instead of jiffies minutes, cookie_clock
 * =wall) and the TCP timestamp offset (ours instead of the kernel's). A
 * SYN-ACK sent under one and its ACK checked under the other fail: the
 * cookie is refused (the client gets a reset) or the options coded in its
 * timestamp are misread (a stalled connection). Measured under TCG with a
 * swap (rmmod + insmod) every 0.8 s: 23 handshakes lost per swap.
 *
 * So every replacement serves two eras and the switch is one store:
 *   - ERA_KERNEL: exactly what the kernel itself does (jiffies counter, the
 *     kernel's offsets). The redirects go on and off in this era, so the
 *     moment each one flips is invisible.
 *   - ERA_MODULE: ours.
 * Cookies are made in the current era. A cookie check also accepts the
 * other era for a while after each switch: HANDOVER_LOAD_MS after a load;
 * at an unload, from the switch back to the kernel's era until the
 * redirects are off, which waits HANDOVER_UNLOAD_MS if the module made or
 * took a cookie in that time before the switch. The era a checked cookie
 * came from is remembered (per CPU), and the timestamp offset the kernel
 * asks for next for its connection, in the same cookie_v{4,6}_check(), is
 * that era's.
 *
 * Limits: a handshake whose ACK comes later than those windows still
 * fails; so does one whose timestamp offset the module cannot reproduce
 * (cookie_clock=jiffies on a kernel without ts_secret, where both eras
 * have the same counter; or a kernel whose ts_secret did not exist yet at
 * load).
 */
#include "internal.h"

#include <linux/delay.h>
#include <linux/jiffies.h>
#include <linux/bottom_half.h>
#include <linux/percpu.h>
#include <linux/string.h>

#define HANDOVER_LOAD_MS 3000
#define HANDOVER_UNLOAD_MS 1000
/*
 * How long a noted era waits for its offset question. It comes microseconds
 * later in the same softirq, but a guest's vCPU may stall between the two
 * for several ticks on a busy host (a 2-tick limit misread one handshake's
 * options under TCG).
 */
#define NOTED_ERA_MS 1000

static int era = TCPSECRETS_ERA_KERNEL;
static unsigned long both_eras_until;	/* jiffies: the end of the window after a load */
static bool unloading;			/* from the switch back until the redirects are off */
static unsigned long module_era_used;	/* jiffies of the last module-era cookie */
static unsigned long other_era_noted;	/* jiffies of the last other-era cookie noted */

int tcpsecrets_era_making(void)
{
	return READ_ONCE(era);
}

/* Whether the check also takes the other era's cookies now. */
static bool window_open(void)
{
	if (READ_ONCE(unloading))
		return true;
	return READ_ONCE(era) == TCPSECRETS_ERA_MODULE &&
	       time_before(jiffies, READ_ONCE(both_eras_until));
}

int tcpsecrets_eras_to_check(int *other)
{
	int now = READ_ONCE(era);

	*other = window_open() ? !now : -1;
	return now;
}

void tcpsecrets_era_used(int used)
{
	unsigned long now = jiffies;

	/* Written at most once a tick: this runs for every cookie made or taken. */
	if (used == TCPSECRETS_ERA_MODULE && READ_ONCE(module_era_used) != now)
		WRITE_ONCE(module_era_used, now);
}

/*
 * The era of the cookie just checked on this CPU, when it is not the
 * current one, for the timestamp offset cookie_v{4,6}_check() asks for
 * next, on the same CPU in the same softirq. Noted whether or not the
 * window is still open then, and taken whether or not it is still open at
 * the question: the window may close between the two. Taken once; only a
 * lookup for the same addresses (and ports, where the kernel passes them)
 * within NOTED_ERA_MS takes it, so a SYN's offset never does. Softirqs are held off around each access (a socket's backlog runs
 * in process context); irqs are not, as no irq handler gets here (and
 * local_irq_save is an indirect paravirt call on 5.10). A migration
 * between the check and the offset, from a backlog, loses the era: the
 * current one's offset is used then.
 */
struct checked_cookie {
	__be32 server[4];
	__be32 client[4];
	__be16 server_port;
	__be16 client_port;
	unsigned long when;
	u8 family;
	u8 era;
	bool valid;
};

static DEFINE_PER_CPU(struct checked_cookie, checked);

void tcpsecrets_era_checked(int family, const __be32 *server, const __be32 *client,
			    __be16 server_port, __be16 client_port, int found)
{
	int words = family == AF_INET ? 1 : 4;
	struct checked_cookie *c;

	if (found == READ_ONCE(era))
		return;
	WRITE_ONCE(other_era_noted, jiffies);
	local_bh_disable();
	c = this_cpu_ptr(&checked);
	memset(c, 0, sizeof(*c));
	memcpy(c->server, server, words * sizeof(__be32));
	memcpy(c->client, client, words * sizeof(__be32));
	c->server_port = server_port;
	c->client_port = client_port;
	c->family = family;
	c->era = found;
	c->when = jiffies;
	c->valid = true;
	local_bh_enable();
}

/* ports: 0 where the kernel's offset function has none (it then matches any). */
int tcpsecrets_era_for(int family, const __be32 *server, const __be32 *client,
		       __be16 server_port, __be16 client_port)
{
	int words = family == AF_INET ? 1 : 4;
	int found = READ_ONCE(era);
	unsigned long ttl = msecs_to_jiffies(NOTED_ERA_MS);
	struct checked_cookie *c;

	if (!time_before(jiffies, READ_ONCE(other_era_noted) + ttl))
		return found;
	local_bh_disable();
	c = this_cpu_ptr(&checked);
	if (c->valid && c->family == family && time_before(jiffies, c->when + ttl) &&
	    (!server_port || (c->server_port == server_port && c->client_port == client_port)) &&
	    !memcmp(c->server, server, words * sizeof(__be32)) &&
	    !memcmp(c->client, client, words * sizeof(__be32))) {
		found = c->era;
		c->valid = false;
	}
	local_bh_enable();
	return found;
}

void tcpsecrets_handover_to_module(void)
{
	WRITE_ONCE(other_era_noted, jiffies - msecs_to_jiffies(NOTED_ERA_MS) - 1);
	WRITE_ONCE(module_era_used, jiffies - msecs_to_jiffies(HANDOVER_UNLOAD_MS) - 1);
	WRITE_ONCE(both_eras_until, jiffies + msecs_to_jiffies(HANDOVER_LOAD_MS));
	WRITE_ONCE(era, TCPSECRETS_ERA_MODULE);
}

void tcpsecrets_handover_to_kernel(void)
{
	bool recent;

	if (READ_ONCE(era) != TCPSECRETS_ERA_MODULE)
		return;
	WRITE_ONCE(unloading, true);
	WRITE_ONCE(era, TCPSECRETS_ERA_KERNEL);
	recent = time_before(jiffies, READ_ONCE(module_era_used) +
					       msecs_to_jiffies(HANDOVER_UNLOAD_MS));
	if (recent)
		msleep(HANDOVER_UNLOAD_MS);
}
