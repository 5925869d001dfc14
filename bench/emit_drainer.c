/*
 * A notify reader with no relaying, for the kmod_emit stage's diagnostics
 * (BENCH_KMOD_DIAG=1): it drains a mount's ring the way scoutfs-notifyd's
 * scoutfs source does (a drain without WAIT; WAIT only on an empty ring;
 * after a drain of fewer than half a ring, a pause of DELAY_US) but does
 * nothing with the records.  The workload timed beside it then pays the
 * kernel's whole part of a drained ring (stored records, the drainer's
 * lock and copies, wakeups) and almost none of a daemon's CPU.
 *
 *	emit_drainer PATH DELAY_US
 *
 * Runs until SIGTERM, then prints one line: records drains waits dropped
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* docs/ABI.md section 3 */
struct read_notify {
	uint64_t buf_ptr;
	uint32_t buf_bytes;
	uint32_t flags;
	uint32_t timeout_ms;
	uint8_t _pad[4];
	uint64_t dropped;
};

#define RECORD_SIZE 64
#define RING_RECORDS 1024
#define READ_NOTIFY_WAIT 1
#define IOC(nr) _IOWR(0xE8, (nr), struct read_notify)

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	static char buf[RING_RECORDS * RECORD_SIZE];
	struct read_notify rn;
	struct sigaction sa;
	struct timespec pause;
	unsigned long req = IOC(25);
	long records = 0, drains = 0, waits = 0;
	long delay_us;
	int fd, n;

	if (argc != 3) {
		fprintf(stderr, "usage: emit_drainer PATH DELAY_US\n");
		return 2;
	}
	delay_us = atol(argv[2]);
	pause.tv_sec = delay_us / 1000000;
	pause.tv_nsec = (delay_us % 1000000) * 1000;
	fd = open(argv[1], O_RDONLY | O_DIRECTORY);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	/* no SA_RESTART: SIGTERM ends a WAIT with EINTR */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);

	memset(&rn, 0, sizeof(rn));
	rn.buf_ptr = (uintptr_t)buf;
	rn.buf_bytes = sizeof(buf);
	/* nr 25 up to v1.30, 26 from v1.31: a wrong number answers ENOTTY */
	n = ioctl(fd, req, &rn);
	if (n < 0 && errno == ENOTTY) {
		req = IOC(26);
		n = ioctl(fd, req, &rn);
	}
	if (n < 0) {
		perror("READ_NOTIFY");
		return 1;
	}
	/* attached: the caller waits for this line before timing */
	printf("attached\n");
	fflush(stdout);
	while (!stop) {
		if (n > 0) {
			records += n;
			drains++;
			if (n < RING_RECORDS / 2 && delay_us)
				nanosleep(&pause, NULL);
		}
		rn.flags = 0;
		n = ioctl(fd, req, &rn);
		if (n == 0) {
			rn.flags = READ_NOTIFY_WAIT;
			rn.timeout_ms = 500;
			waits++;
			n = ioctl(fd, req, &rn);
		}
		if (n < 0 && errno != EINTR) {
			perror("READ_NOTIFY");
			return 1;
		}
	}
	printf("%ld %ld %ld %llu\n", records, drains, waits, (unsigned long long)rn.dropped);
	return 0;
}
