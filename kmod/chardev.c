// SPDX-License-Identifier: GPL-2.0
/*
 * /dev/tcpsecrets: a read at offset 0 returns one whole, fresh snapshot;
 * reading on gets end-of-file, so `cat` and `dd` work and pread(fd, .., 0)
 * takes a new snapshot on the same descriptor. A buffer too small for the
 * snapshot gets -EINVAL: a reader never sees a torn struct.
 *
 * A write of exactly one struct tcpsecrets_set applies it (anycast `set`):
 * only root or the write_gid group may open the device for writing.
 */
#include "internal.h"

#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/string.h>
#include <linux/uaccess.h>

static int tcpsecrets_dev_open(struct inode *inode, struct file *file)
{
	if ((file->f_mode & FMODE_READ) && !tcpsecrets_may_read())
		return -EACCES;
	if ((file->f_mode & FMODE_WRITE) && !tcpsecrets_may_write())
		return -EACCES;
	return 0;
}

static ssize_t tcpsecrets_dev_read(struct file *file, char __user *buf,
				   size_t len, loff_t *pos)
{
	struct tcpsecrets_snapshot snap;
	ssize_t ret = sizeof(snap);

	if (*pos != 0)
		return 0;
	if (len < sizeof(snap))
		return -EINVAL;

	tcpsecrets_take_snapshot(&snap);
	if (copy_to_user(buf, &snap, sizeof(snap)))
		ret = -EFAULT;
	else
		*pos += sizeof(snap);
	memzero_explicit(&snap, sizeof(snap));
	return ret;
}

static ssize_t tcpsecrets_dev_write(struct file *file, const char __user *buf,
				    size_t len, loff_t *pos)
{
	struct tcpsecrets_set set;
	int err;

	if (len != sizeof(set))
		return -EINVAL;
	if (copy_from_user(&set, buf, sizeof(set)))
		err = -EFAULT;
	else
		err = tcpsecrets_apply_set(&set);
	memzero_explicit(&set, sizeof(set));
	return err ? err : len;
}

static const struct file_operations tcpsecrets_dev_fops = {
	.owner = THIS_MODULE,
	.open = tcpsecrets_dev_open,
	.read = tcpsecrets_dev_read,
	.write = tcpsecrets_dev_write,
	.llseek = default_llseek,
};

static struct miscdevice tcpsecrets_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = TCPSECRETS_DEVICE_NAME,
	.fops = &tcpsecrets_dev_fops,
};

int tcpsecrets_chardev_init(void)
{
	int err;

	/*
	 * devtmpfs cannot give the node a group, so with a reader (writer)
	 * group the node is world-readable (-writable) and open() above is the
	 * gate (root or a member of that group); without one, only root passes
	 * either check.
	 */
	tcpsecrets_dev.mode = (gid_valid(tcpsecrets_read_group()) ? 0444 : 0400) |
			      (gid_valid(tcpsecrets_write_group()) ? 0222 : 0200);
	err = misc_register(&tcpsecrets_dev);
	if (err)
		pr_err("cannot register /dev/%s (error %d)\n",
		       TCPSECRETS_DEVICE_NAME, err);
	return err;
}

void tcpsecrets_chardev_exit(void)
{
	misc_deregister(&tcpsecrets_dev);
}
