// What an NBD secondary costs per replicated write, two builds side by side
// (bench/blk/secondary_ab.sh): a client writes 4 KiB at queue depth 1 to the NBD servers on
// 127.0.0.1:PORT_A and :PORT_B as the replication primary does (send the request, poll for
// the reply up to PSPIN µs yielding, then sleep), in segments of 0.25 s that alternate ABBA,
// so the host's speed swings hit both builds alike. Each pair of segments gives the p50 round
// trip of each server and their difference; no local write and no vhost-user in the way, so a
// change in the secondary's path shows undiluted.
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include "nbd_model.h"

static int connect_to(const char *port, const char *export_name) {
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons((uint16_t)atoi(port))};
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("connect");
    nbd_handshake(fd, export_name);
    return fd;
}

// Writes for `seconds` to `fd`; returns the p50 round trip in µs.
static double segment(int fd, double seconds, double spin_us, uint64_t blocks, unsigned *seed,
                      double *lat) {
    static char buf[HEADER + BLOCK];
    size_t n = 0;
    double end = now_us() + seconds * 1e6;
    while (now_us() < end && n < MAX_SAMPLES) {
        uint64_t off = (uint64_t)(rand_r(seed) % blocks) * BLOCK;
        put_request(buf, off);
        double t0 = now_us();
        send_all(fd, buf, sizeof buf);
        char reply[REPLY];
        wait_readable(fd, spin_us);
        recv_exactly(fd, reply, REPLY);
        lat[n++] = now_us() - t0;
        check_reply(reply, off);
    }
    qsort(lat, n, sizeof *lat, by_value);
    return lat[n / 2];
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PORT_A PORT_B IMAGE_BYTES PAIRS\n", argv[0]);
        return 2;
    }
    double spin_us = getenv("PSPIN") ? atof(getenv("PSPIN")) : 50;
    const char *export_name = getenv("NBD_EXPORT") ? getenv("NBD_EXPORT") : "colo-disk0";
    uint64_t blocks = strtoull(argv[3], NULL, 10) / BLOCK;
    int pairs = atoi(argv[4]);
    if (blocks == 0 || pairs <= 0 || pairs > 1000) {
        fprintf(stderr, "bad IMAGE_BYTES or PAIRS (1..1000)\n");
        return 2;
    }
    int fd[2] = {connect_to(argv[1], export_name), connect_to(argv[2], export_name)};
    static double lat[MAX_SAMPLES];
    double diff[1000];
    unsigned seed = 1;
    printf("| pair | A p50 µs | B p50 µs | B - A µs |\n|---:|---:|---:|---:|\n");
    for (int i = 0; i < pairs; i++) {
        double p50[2];
        int first = i % 2;
        p50[first] = segment(fd[first], 0.25, spin_us, blocks, &seed, lat);
        p50[!first] = segment(fd[!first], 0.25, spin_us, blocks, &seed, lat);
        diff[i] = p50[1] - p50[0];
        printf("| %d | %.1f | %.1f | %.1f |\n", i + 1, p50[0], p50[1], diff[i]);
    }
    qsort(diff, pairs, sizeof *diff, by_value);
    int b_faster = 0;
    for (int i = 0; i < pairs; i++)
        b_faster += diff[i] < 0;
    printf("\nB - A, median %.1f µs; B faster in %d of %d pairs\n", diff[pairs / 2], b_faster,
           pairs);
    return 0;
}
