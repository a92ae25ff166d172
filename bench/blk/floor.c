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
// Requests and replies are NBD's simple ones (WRITE, no flags), so with NBD_PORT set the
// primary talks instead to a real NBD server on 127.0.0.1:NBD_PORT (fixed-newstyle handshake,
// EXPORT_NAME NBD_EXPORT or "colo-disk0"): floor.sh --ours-secondary puts vhost-blk-colo's
// replication secondary there, to tell the secondary's share of what replication adds.
// Local-only and replicated segments of 0.25 s alternate (ABBA), so the host's speed swings
// hit both alike; each pair gives one ratio of p50 latencies, as blk_bench prints them.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
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

#include "nbd_model.h"


static double secondary_spin_us = 150, primary_spin_us = 50;
static int kick_fd, call_fd, primary_file, secondary_file, primary_sock, secondary_sock;
static volatile int replicate;
static off_t blocks;

static void *secondary(void *unused) {
    (void)unused;
    serve_writes(secondary_sock, secondary_file, secondary_spin_us);
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
        put_request(buf, off);
        int remote = replicate;
        if (remote && send(primary_sock, buf, sizeof buf, 0) != (ssize_t)sizeof buf)
            die("primary send");
        if (pwrite(primary_file, buf + HEADER, BLOCK, (off_t)off) != BLOCK)
            die("primary pwrite");
        if (remote) {
            char reply[REPLY];
            wait_readable(primary_sock, primary_spin_us);
            recv_exactly(primary_sock, reply, REPLY);
            check_reply(reply, off);
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
    const char *nbd_port = getenv("NBD_PORT");
    if (nbd_port)
        sa.sin_port = htons((uint16_t)atoi(nbd_port));
    primary_sock = socket(AF_INET, SOCK_STREAM, 0);
    if (primary_sock < 0 || connect(primary_sock, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");
    int one = 1;
    if (setsockopt(primary_sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("TCP_NODELAY");
    pthread_t p, s;
    if (nbd_port) {
        nbd_handshake(primary_sock, getenv("NBD_EXPORT") ? getenv("NBD_EXPORT") : "colo-disk0");
    } else {
        secondary_sock = accept(listener, NULL, NULL);
        if (secondary_sock < 0 ||
            setsockopt(secondary_sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
            die("accept");
        if (pthread_create(&s, NULL, secondary, NULL))
            die("pthread_create");
    }
    if (pthread_create(&p, NULL, primary, NULL))
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
    printf("\n%s, primary reply poll %.0f µs: median ratio %.2f, within 1.5x in %d of %d "
           "pairs\n",
           nbd_port ? "secondary: the NBD server on NBD_PORT" : "secondary: the model's",
           primary_spin_us, ratios[pairs / 2], within, pairs);
    return 0;
}
