/*
 * Drain a mount's file access notification ring and print its records.
 *
 * Copyright (C) 2026 The scoutfs-notify authors.  All rights reserved.
 *
 * This program is free software; you can redistribute it and/or
 * modify it under the terms of the GNU General Public
 * License v2 as published by the Free Software Foundation.
 *
 * This program is distributed in the hope that it will be useful,
 * but WITHOUT ANY WARRANTY; without even the implied warranty of
 * MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the GNU
 * General Public License for more details.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <errno.h>
#include <endian.h>
#include <libgen.h>
#include <linux/types.h>

#include "ioctl.h"

#define NR_RECS 2048
#define MAX_FILES 16

static struct scoutfs_ioctl_notify_record recs[NR_RECS];

static void exit_usage(char *prog)
{
	fprintf(stderr,
		"usage: %s [-d|-w|-s] [-n NR] PATH [FILE...]\n"
		"  drain the notification ring of the mount that holds PATH,\n"
		"  printing each record with the name of the FILE it's for,\n"
		"  seq gaps, and the dropped count\n"
		"  -d  detach instead\n"
		"  -w  wait for a record\n"
		"  -s  summarize: count the records and gaps\n"
		"  -n  drain at most NR records\n", prog);
	exit(1);
}

static const char *accmode(unsigned int flags)
{
	switch (flags & O_ACCMODE) {
	case O_RDONLY:
		return "rdonly";
	case O_WRONLY:
		return "wronly";
	default:
		return "rdwr";
	}
}

int main(int argc, char **argv)
{
	struct scoutfs_ioctl_read_notify rn;
	struct scoutfs_ioctl_notify_record *rec;
	unsigned long long inos[MAX_FILES];
	char *names[MAX_FILES];
	unsigned long long seq = 0;
	unsigned long long gaps = 0;
	unsigned long long ino;
	struct stat st;
	int detach = 0;
	int summary = 0;
	int wait = 0;
	int nr = NR_RECS;
	int nr_files;
	int fd;
	int ret;
	int c;
	int i;
	int j;

	while ((c = getopt(argc, argv, "dwsn:")) != -1) {
		switch (c) {
		case 'd':
			detach = 1;
			break;
		case 'w':
			wait = 1;
			break;
		case 's':
			summary = 1;
			break;
		case 'n':
			nr = atoi(optarg);
			if (nr < 1 || nr > NR_RECS)
				exit_usage(argv[0]);
			break;
		default:
			exit_usage(argv[0]);
		}
	}
	if (optind >= argc || argc - optind - 1 > MAX_FILES)
		exit_usage(argv[0]);

	nr_files = argc - optind - 1;
	for (i = 0; i < nr_files; i++) {
		if (stat(argv[optind + 1 + i], &st) < 0) {
			perror(argv[optind + 1 + i]);
			return 1;
		}
		inos[i] = st.st_ino;
		names[i] = basename(argv[optind + 1 + i]);
	}

	fd = open(argv[optind], O_RDONLY);
	if (fd < 0) {
		perror(argv[optind]);
		return 1;
	}

	memset(&rn, 0, sizeof(rn));
	rn.buf_ptr = (unsigned long)recs;
	rn.buf_bytes = nr * sizeof(recs[0]);
	rn.flags = detach ? SCOUTFS_IOC_READ_NOTIFY_DETACH :
		   wait ? SCOUTFS_IOC_READ_NOTIFY_WAIT : 0;

	ret = ioctl(fd, SCOUTFS_IOC_READ_NOTIFY, &rn);
	if (ret < 0) {
		printf("read_notify: %s\n", strerror(errno));
		return 1;
	}

	for (i = 0; i < ret; i++) {
		rec = &recs[i];
		if (seq && le64toh(rec->seq) != seq + 1) {
			gaps += le64toh(rec->seq) - seq - 1;
			if (!summary)
				printf("gap %llu\n",
				       (unsigned long long)le64toh(rec->seq) - seq - 1);
		}
		seq = le64toh(rec->seq);
		if (summary)
			continue;

		ino = le64toh(rec->ino);
		for (j = 0; j < nr_files && inos[j] != ino; j++)
			;
		if (j < nr_files)
			printf("%s", names[j]);
		else
			printf("ino %llu", ino);

		switch (le16toh(rec->type)) {
		case SCOUTFS_IOC_NOTIFY_OPEN:
			printf(" open %s\n", accmode(le32toh(rec->flags)));
			break;
		case SCOUTFS_IOC_NOTIFY_READ:
			printf(" read pos %llu count %llu\n",
			       (unsigned long long)le64toh(rec->pos),
			       (unsigned long long)le64toh(rec->count));
			break;
		default:
			printf(" type %u\n", le16toh(rec->type));
			break;
		}
	}

	if (summary)
		printf("records %d gaps %llu\n", ret, gaps);
	if (!detach)
		printf("dropped %llu\n", (unsigned long long)rn.dropped);

	close(fd);
	return 0;
}
