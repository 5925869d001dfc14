TRACE_EVENT(scoutfs_notify_attach,
	TP_PROTO(struct super_block *sb, int pid, int prev_pid, u64 stored),

	TP_ARGS(sb, pid, prev_pid, stored),

	TP_STRUCT__entry(
		SCSB_TRACE_FIELDS
		__field(int, pid)
		__field(int, prev_pid)
		__field(__u64, stored)
	),

	TP_fast_assign(
		SCSB_TRACE_ASSIGN(sb);
		__entry->pid = pid;
		__entry->prev_pid = prev_pid;
		__entry->stored = stored;
	),

	TP_printk(SCSBF" pid %d prev_pid %d stored %llu", SCSB_TRACE_ARGS,
		  __entry->pid, __entry->prev_pid, __entry->stored)
);

TRACE_EVENT(scoutfs_notify_detach,
	TP_PROTO(struct super_block *sb, int pid, u64 discarded),

	TP_ARGS(sb, pid, discarded),

	TP_STRUCT__entry(
		SCSB_TRACE_FIELDS
		__field(int, pid)
		__field(__u64, discarded)
	),

	TP_fast_assign(
		SCSB_TRACE_ASSIGN(sb);
		__entry->pid = pid;
		__entry->discarded = discarded;
	),

	TP_printk(SCSBF" pid %d discarded %llu", SCSB_TRACE_ARGS,
		  __entry->pid, __entry->discarded)
);

TRACE_EVENT(scoutfs_notify_drop,
	TP_PROTO(struct super_block *sb, u64 ino, u16 type, u64 seq,
		 u64 dropped),

	TP_ARGS(sb, ino, type, seq, dropped),

	TP_STRUCT__entry(
		SCSB_TRACE_FIELDS
		__field(__u64, ino)
		__field(__u16, type)
		__field(__u64, seq)
		__field(__u64, dropped)
	),

	TP_fast_assign(
		SCSB_TRACE_ASSIGN(sb);
		__entry->ino = ino;
		__entry->type = type;
		__entry->seq = seq;
		__entry->dropped = dropped;
	),

	TP_printk(SCSBF" ino %llu type %u seq %llu dropped %llu",
		  SCSB_TRACE_ARGS, __entry->ino, __entry->type, __entry->seq,
		  __entry->dropped)
);
