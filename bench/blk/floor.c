// The floor of the replication design on this host: the least a 4 KiB QD1 replicated write
// can cost over loopback, measured with nothing of ours in the way (bench/blk/floor.sh).
//
// Three threads play the roles of a vhost-user-blk write, with the same waits as vhost-blk-colo:
// - the frontend kicks an eventfd and sleeps in poll() until the call eventfd fires (as
//   vhost_blk_colo::testing::TestFrontend does);
// - the primary sleeps in epoll_wait() for the kick, then, when replicating, sends the request
//   (a 28-byte NBD-sized header and 4 KiB) over loopback TCP with TCP_NODELAY, writes its own
//   file with pwrite(), polls for the 16-byte reply (PSPIN µs, yielding, then sleeps), and
//   signals the call eventfd;
// - the secondary polls for the next request (SSPIN µs, yielding, then sleeps), reads it,
//   writes its own file with pwrite() and replies.
// Local-only and replicated segments of 0.25 s alternate (ABBA), so the host's speed swings
// hit both alike; each pair gives one ratio of p50 latencies, as blk_bench prints them.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { BLOCK = 4096, HEADER = 28, REPLY = 16, MAX_SAMPLES = 1 << 20 };

static double secondary_spin_us = 150, primary_spin_us = 50;
static int kick_fd, call_fd, primary_file, secondary_file, primary_sock, secondary_sock;
static volatile int replicate;
static off_t blocks;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// Polls fd for incoming bytes for up to max_us, yielding between polls; else sleeps in poll().
static void wait_readable(int fd, double max_us) {
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

static void recv_exactly(int fd, char *b, size_t n) {
    while (n > 0) {
        ssize_t r = recv(fd, b, n, 0);
        if (r <= 0)
            die("recv");
        b += r;
        n -= (size_t)r;
    }
}

static void *secondary(void *unused) {
    (void)unused;
    static char buf[HEADER + BLOCK];
    char reply[REPLY] = {0};
    for (;;) {
        wait_readable(secondary_sock, secondary_spin_us);
        recv_exactly(secondary_sock, buf, sizeof buf);
        uint64_t off;
        memcpy(&off, buf + 16, sizeof off);
        if (pwrite(secondary_file, buf + HEADER, BLOCK, (off_t)off) != BLOCK)
            die("secondary pwrite");
        if (send(secondary_sock, reply, REPLY, 0) != REPLY)
            die("secondary send");
    }
    return NULL;
}

static void *primary(void *unused) {
    (void)unused;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, kick_fd, &ev) < 0)
        die("epoll");
    static char buf[HEADER + BLOCK];
    memset(buf, 0x33, sizeof buf);
    unsigned seed = 1;
    for (;;) {
        struct epoll_event out;
        if (epoll_wait(ep, &out, 1, -1) < 0)
            die("epoll_wait");
        uint64_t v;
        if (read(kick_fd, &v, sizeof v) != sizeof v)
            continue;
        uint64_t off = (uint64_t)(rand_r(&seed) % blocks) * BLOCK;
        memcpy(buf + 16, &off, sizeof off);
        int remote = replicate;
        if (remote && send(primary_sock, buf, sizeof buf, 0) != (ssize_t)sizeof buf)
            die("primary send");
        if (pwrite(primary_file, buf + HEADER, BLOCK, (off_t)off) != BLOCK)
            die("primary pwrite");
        if (remote) {
            char reply[REPLY];
            wait_readable(primary_sock, primary_spin_us);
            recv_exactly(primary_sock, reply, REPLY);
        }
        v = 1;
        if (write(call_fd, &v, sizeof v) != sizeof v)
            die("call");
    }
    return NULL;
}

// Runs the frontend for `seconds`, replicated or not; returns the p50 latency in µs.
static double segment(int remote, double seconds, double *lat) {
    replicate = remote;
    size_t n = 0;
    double end = now_us() + seconds * 1e6;
    while (now_us() < end && n < MAX_SAMPLES) {
        double t0 = now_us();
        uint64_t v = 1;
        if (write(kick_fd, &v, sizeof v) != sizeof v)
            die("kick");
        struct pollfd p = {call_fd, POLLIN, 0};
        if (poll(&p, 1, -1) < 0 || read(call_fd, &v, sizeof v) != sizeof v)
            die("wait for call");
        lat[n++] = now_us() - t0;
    }
    qsort(lat, n, sizeof *lat, by_value);
    return lat[n / 2];
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PRIMARY_IMAGE SECONDARY_IMAGE PAIRS\n", argv[0]);
        return 2;
    }
    if (getenv("SSPIN"))
        secondary_spin_us = atof(getenv("SSPIN"));
    if (getenv("PSPIN"))
        primary_spin_us = atof(getenv("PSPIN"));
    primary_file = open(argv[1], O_RDWR);
    secondary_file = open(argv[2], O_RDWR);
    int pairs = atoi(argv[3]);
    if (primary_file < 0 || secondary_file < 0)
        die("open image");
    blocks = lseek(primary_file, 0, SEEK_END) / BLOCK;
    if (blocks <= 0 || pairs <= 0 || pairs > 1000) {
        fprintf(stderr, "empty image or bad PAIRS (1..1000)\n");
        return 2;
    }
    kick_fd = eventfd(0, EFD_NONBLOCK);
    call_fd = eventfd(0, 0);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    if (kick_fd < 0 || call_fd < 0 || listener < 0 ||
        bind(listener, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        getsockname(listener, (struct sockaddr *)&sa, &sl) < 0 || listen(listener, 1) < 0)
        die("set-up");
    primary_sock = socket(AF_INET, SOCK_STREAM, 0);
    if (primary_sock < 0 || connect(primary_sock, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");
    secondary_sock = accept(listener, NULL, NULL);
    int one = 1;
    if (secondary_sock < 0 ||
        setsockopt(primary_sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
        setsockopt(secondary_sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("accept");
    pthread_t p, s;
    if (pthread_create(&p, NULL, primary, NULL) || pthread_create(&s, NULL, secondary, NULL))
        die("pthread_create");
    static double lat[MAX_SAMPLES];
    double ratios[1000];
    int within = 0;
    printf("| pair | local only p50 µs | replicated p50 µs | replicated - local µs | ratio |\n");
    printf("|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < pairs; i++) {
        double local, repl;
        if (i % 2 == 0) {
            local = segment(0, 0.25, lat);
            repl = segment(1, 0.25, lat);
        } else {
            repl = segment(1, 0.25, lat);
            local = segment(0, 0.25, lat);
        }
        ratios[i] = repl / local;
        within += ratios[i] <= 1.5;
        printf("| %d | %.1f | %.1f | %.1f | %.2f |\n", i + 1, local, repl, repl - local, ratios[i]);
    }
    qsort(ratios, pairs, sizeof *ratios, by_value);
    printf("\nsecondary poll %.0f µs, primary reply poll %.0f µs: median ratio %.2f, "
           "within 1.5x in %d of %d pairs\n",
           secondary_spin_us, primary_spin_us, ratios[pairs / 2], within, pairs);
    return 0;
}
