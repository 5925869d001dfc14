/*
 * The read-heavy workload of the kmod_emit stage, run in the VM: open every
 * file named on stdin, read it to the end in CHUNK-byte reads, close; ROUNDS
 * times.  Python's own per-call cost would hide the kernel's under tcg, so
 * this is C.
 *
 *	emit_workload ROUNDS CHUNK < list-of-files
 *
 * Prints one line: seconds opens reads
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_FILES 100000

static char *paths[MAX_FILES];

int main(int argc, char **argv)
{
	char line[4096];
	char buf[65536];
	struct timespec t0, t1;
	long rounds, chunk, opens = 0, reads = 0;
	int nr = 0;

	if (argc != 3) {
		fprintf(stderr, "usage: emit_workload ROUNDS CHUNK < list-of-files\n");
		return 2;
	}
	rounds = atol(argv[1]);
	chunk = atol(argv[2]);
	if (rounds < 1 || chunk < 1 || chunk > (long)sizeof(buf)) {
		fprintf(stderr, "emit_workload: bad ROUNDS or CHUNK\n");
		return 2;
	}
	while (nr < MAX_FILES && fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = '\0';
		if (line[0])
			paths[nr++] = strdup(line);
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long r = 0; r < rounds; r++) {
		for (int i = 0; i < nr; i++) {
			int fd = open(paths[i], O_RDONLY);
			ssize_t n;

			if (fd < 0) {
				perror(paths[i]);
				return 1;
			}
			opens++;
			while ((n = read(fd, buf, chunk)) > 0)
				reads++;
			if (n < 0) {
				perror(paths[i]);
				return 1;
			}
			close(fd);
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.6f %ld %ld\n",
	       (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, opens, reads);
	return 0;
}
