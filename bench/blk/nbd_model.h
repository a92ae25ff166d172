// Helpers shared by the C models in bench/blk (floor.c, nbd_rtt.c): NBD's simple WRITE
// request and reply, a fixed-newstyle client handshake, and the poll-then-sleep wait that
// vhost-blk-colo's threads use. Header-only: each model is one `cc` command.
#pragma once
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { BLOCK = 4096, HEADER = 28, REPLY = 16, MAX_SAMPLES = 1 << 20 };
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_REPLY_MAGIC 0x67446698u
#define NBD_CMD_WRITE 1

static inline void die(const char *what) {
    perror(what);
    exit(1);
}

static inline double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static inline int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// Polls fd for incoming bytes for up to max_us, yielding between polls; else sleeps in poll().
static inline void wait_readable(int fd, double max_us) {
    double t0 = now_us();
    char b;
    while (now_us() - t0 < max_us) {
        if (recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) >= 0)
            return;
        sched_yield();
    }
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, -1) < 0)
        die("poll");
}

static inline void recv_exactly(int fd, char *b, size_t n) {
    while (n > 0) {
        ssize_t r = recv(fd, b, n, 0);
        if (r <= 0)
            die("recv");
        b += r;
        n -= (size_t)r;
    }
}

// An NBD simple WRITE request of one block at `off` (cookie = offset).
static inline void put_request(char *buf, uint64_t off) {
    uint32_t magic = htonl(NBD_REQUEST_MAGIC), len = htonl(BLOCK);
    uint16_t flags = 0, type = htons(NBD_CMD_WRITE);
    uint64_t be_off = htobe64(off);
    memcpy(buf, &magic, 4);
    memcpy(buf + 4, &flags, 2);
    memcpy(buf + 6, &type, 2);
    memcpy(buf + 8, &off, 8);
    memcpy(buf + 16, &be_off, 8);
    memcpy(buf + 24, &len, 4);
}

static inline void send_all(int fd, const void *b, size_t n) {
    if (send(fd, b, n, MSG_NOSIGNAL) != (ssize_t)n)
        die("send");
}

// Fixed-newstyle handshake as a client: NO_ZEROES, then EXPORT_NAME.
static inline void nbd_handshake(int fd, const char *export_name) {
    char greeting[18];
    recv_exactly(fd, greeting, sizeof greeting);
    if (memcmp(greeting, "NBDMAGICIHAVEOPT", 16) != 0) {
        fprintf(stderr, "not a fixed-newstyle NBD server\n");
        exit(1);
    }
    uint32_t client_flags = htonl(1 | 2); // FIXED_NEWSTYLE | NO_ZEROES
    uint32_t opt = htonl(1), opt_len = htonl((uint32_t)strlen(export_name)); // EXPORT_NAME
    send_all(fd, &client_flags, 4);
    send_all(fd, "IHAVEOPT", 8);
    send_all(fd, &opt, 4);
    send_all(fd, &opt_len, 4);
    send_all(fd, export_name, strlen(export_name));
    char export_info[10]; // size, transmission flags
    recv_exactly(fd, export_info, sizeof export_info);
}

// Checks a simple reply to the WRITE at `off` (cookie = offset); exits on a bad one.
static inline void check_reply(const char *reply, uint64_t off) {
    uint32_t magic, error;
    memcpy(&magic, reply, 4);
    memcpy(&error, reply + 4, 4);
    if (ntohl(magic) != NBD_REPLY_MAGIC || error != 0 || memcmp(reply + 8, &off, 8) != 0) {
        fprintf(stderr, "bad NBD reply (magic %#x, error %u)\n", ntohl(magic), ntohl(error));
        exit(1);
    }
}

// The model secondary: for each request on `sock`, polls for it (spin_us, then sleeps), reads
// it whole, writes its block to `file` with pwrite() and replies. Requests are the models'
// one-block WRITEs; returns when the peer closes.
static inline void serve_writes(int sock, int file, double spin_us) {
    static char buf[HEADER + BLOCK];
    char reply[REPLY] = {0};
    for (;;) {
        wait_readable(sock, spin_us);
        ssize_t got = recv(sock, buf, sizeof buf, 0);
        if (got == 0)
            return;
        if (got < 0)
            die("secondary recv");
        recv_exactly(sock, buf + got, sizeof buf - (size_t)got);
        uint64_t off;
        memcpy(&off, buf + 16, sizeof off);
        off = be64toh(off);
        if (pwrite(file, buf + HEADER, BLOCK, (off_t)off) != BLOCK)
            die("secondary pwrite");
        uint32_t magic = htonl(NBD_REPLY_MAGIC);
        memcpy(reply, &magic, 4);
        memcpy(reply + 8, buf + 8, 8); // the cookie
        if (send(sock, reply, REPLY, 0) != REPLY)
            die("secondary send");
    }
}
