/*
 * Drain the mount's file access notification ring, see notify.c.  The
 * calling process becomes the mount's only reader unless another live
 * process is.
 */
static long scoutfs_ioc_read_notify(struct file *file, unsigned long arg)
{
	struct super_block *sb = file_inode(file)->i_sb;
	struct scoutfs_ioctl_read_notify __user *urn = (void __user *)arg;
	struct scoutfs_ioctl_read_notify rn;
	const size_t size = sizeof(struct scoutfs_ioctl_notify_record);
	int ret;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (copy_from_user(&rn, urn, sizeof(rn)))
		return -EFAULT;
	if (rn.buf_bytes == 0 || rn.buf_bytes % size != 0 ||
	    (rn.flags & SCOUTFS_IOC_READ_NOTIFY_UNKNOWN) ||
	    memchr_inv(rn._pad, 0, sizeof(rn._pad)))
		return -EINVAL;

	if (rn.flags & SCOUTFS_IOC_READ_NOTIFY_DETACH)
		return scoutfs_notify_detach(sb);

	ret = scoutfs_notify_attach(sb);
	if (ret == 0 && (rn.flags & SCOUTFS_IOC_READ_NOTIFY_WAIT))
		ret = scoutfs_notify_wait(sb, rn.timeout_ms);
	if (ret == 0)
		ret = scoutfs_notify_drain(sb,
					   (void __user *)(unsigned long)rn.buf_ptr,
					   rn.buf_bytes / size, &urn->dropped);
	return ret;
}

