#
# File access notification: records of opens and reads of regular
# files are only kept while a reader is attached, on the mount where
# the access happened, and a full ring drops records but leaves a gap
# in their sequence numbers.
#

t_require_commands read_notify dd
t_require_mounts 2

echo "== nothing is recorded before a reader attaches"
echo contents > "$T_D0/file"
cat "$T_D0/file" > /dev/null
read_notify "$T_D0" "$T_D0/file"

echo "== opens and reads of regular files are recorded"
cat "$T_D0/file" > /dev/null
dd if="$T_D0/file" of=/dev/null bs=4 skip=1 status=none
echo more >> "$T_D0/file"
ls "$T_D0" > /dev/null
read_notify "$T_D0" "$T_D0/file"

echo "== each mount records its own accesses"
read_notify "$T_D1" "$T_D1/file"
cat "$T_D1/file" > /dev/null
read_notify "$T_D0" "$T_D0/file"
read_notify "$T_D1" "$T_D1/file"

echo "== a waiting reader wakes for a record and keeps others out"
attached=$(t_counter notify_reader_attached 0)
read_notify -w "$T_D0" "$T_D0/file" > "$T_TMP.waiter" &
pid=$!
while [ "$(t_counter notify_reader_attached 0)" == "$attached" ]; do
	sleep .1
done
read_notify "$T_D0"
: < "$T_D0/file"
wait $pid
cat "$T_TMP.waiter"

echo "== a full ring drops records and leaves a gap"
old=$(t_counter notify_dropped_ring_full 0)
for i in $(seq 1200); do
	: < "$T_D0/file"
done
t_counter_diff notify_dropped_ring_full $old 0
read_notify -s -n 1023 "$T_D0"
: < "$T_D0/file"
read_notify "$T_D0" "$T_D0/file"

echo "== detach stops recording and empties the ring"
: < "$T_D0/file"
read_notify -d "$T_D0"
cat "$T_D0/file" > /dev/null
read_notify "$T_D0" "$T_D0/file"
read_notify -d "$T_D0"
read_notify -d "$T_D1"

t_pass
