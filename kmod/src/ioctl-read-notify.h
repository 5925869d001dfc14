
/*
 * Each mount has a ring of records describing successful opens and
 * reads of regular files.  Records are 64 bytes and little endian, and
 * readers skip types they don't know.
 *
 * @seq: per-mount sequence number, starts at 1 and advances for every
 * record emitted, including those dropped because the ring was full, so
 * a gap tells readers that records were lost.
 * @time_ns: CLOCK_REALTIME at emit.
 * @pos, @count: the file position and bytes returned by a read, 0 for
 * opens.
 * @pid, @uid, @gid: the accessing tgid, fsuid and fsgid, in the initial
 * namespaces.
 * @flags: f_flags of an open, 0 for reads.
 */
struct scoutfs_ioctl_notify_record {
	__le64 seq;
	__le64 ino;
	__le64 time_ns;
	__le64 pos;
	__le64 count;
	__le32 pid;
	__le32 uid;
	__le32 gid;
	__le32 flags;
	__le16 type;
	__le16 version;
	__u8 _pad[4];
};

#define SCOUTFS_IOC_NOTIFY_VERSION	1

#define SCOUTFS_IOC_NOTIFY_OPEN		1
#define SCOUTFS_IOC_NOTIFY_READ		2

/*
 * Copy the oldest records in the mount's notification ring into the
 * caller's buffer.  The first caller becomes the mount's only reader
 * and records are only emitted while a reader is attached.
 *
 * @buf_ptr: user address of an array of struct
 * scoutfs_ioctl_notify_record.
 * @buf_bytes: size of that array, a non-zero multiple of the record
 * size, checked for DETACH too.
 * @flags: WAIT sleeps until a record is available, a signal arrives, or
 * @timeout_ms passes (0 waits without a timeout).  DETACH stops
 * emission and empties the ring, no records are copied.
 * @dropped: out, records dropped on a full ring since this reader
 * attached, written on every successful call.
 *
 * Returns the number of records copied, 0 only after a WAIT timeout,
 * without WAIT on an empty ring, for DETACH, or when another thread of
 * the reader detached while this one waited.  Records are only
 * consumed once they and @dropped have been copied, so EFAULT loses
 * nothing.  Sequence numbers are per mount: a new reader continues
 * from where the last one left off, and takes over the records that
 * an exited reader left in the ring.
 *
 * EPERM: the caller doesn't have CAP_SYS_ADMIN.
 * EINVAL: bad @buf_bytes, unknown @flags, or non-zero @_pad.
 * EFAULT: the argument or the buffer couldn't be copied.
 * EBUSY: another live process is the reader (for DETACH too).
 * EINTR: a signal interrupted a WAIT.
 */
struct scoutfs_ioctl_read_notify {
	__u64 buf_ptr;
	__u32 buf_bytes;
	__u32 flags;
	__u32 timeout_ms;
	__u8 _pad[4];
	__u64 dropped;
};

#define SCOUTFS_IOC_READ_NOTIFY_WAIT	(1 << 0)
#define SCOUTFS_IOC_READ_NOTIFY_DETACH	(1 << 1)
#define SCOUTFS_IOC_READ_NOTIFY_UNKNOWN	(U32_MAX << 2)

#define SCOUTFS_IOC_READ_NOTIFY \
	_IOWR(SCOUTFS_IOCTL_MAGIC, 25, struct scoutfs_ioctl_read_notify)
