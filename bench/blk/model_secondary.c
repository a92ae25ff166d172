// The model's secondary as an NBD server (bench/blk/secondary_ab.sh with BIN "model"): the
// floor of what a secondary's share of a replicated 4 KiB write costs on this host, beside
// vhost-blk-colo's. Listens on a free loopback port (printed on stdout), serves one client:
// fixed-newstyle handshake (EXPORT_NAME of any name, NO_ZEROES), then the models' one-block
// WRITEs into IMAGE with the same poll as bench/blk/floor.c's secondary (SSPIN µs, default
// 150), until the client closes.
#define _GNU_SOURCE
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include "nbd_model.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE\n", argv[0]);
        return 2;
    }
    double spin_us = getenv("SSPIN") ? atof(getenv("SSPIN")) : 150;
    int file = open(argv[1], O_RDWR);
    if (file < 0)
        die("open image");
    uint64_t size = (uint64_t)lseek(file, 0, SEEK_END);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (listener < 0 || bind(listener, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        getsockname(listener, (struct sockaddr *)&sa, &sl) < 0 || listen(listener, 1) < 0)
        die("listen");
    printf("%u\n", ntohs(sa.sin_port));
    fflush(stdout);
    int sock = accept(listener, NULL, NULL);
    if (sock < 0 || setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("accept");
    // Handshake: greeting with FIXED_NEWSTYLE | NO_ZEROES, the client's flags, one option.
    uint16_t handshake_flags = htons(1 | 2);
    send_all(sock, "NBDMAGICIHAVEOPT", 16);
    send_all(sock, &handshake_flags, 2);
    char client_flags[4], option[16];
    recv_exactly(sock, client_flags, sizeof client_flags);
    recv_exactly(sock, option, sizeof option);
    uint32_t opt, len;
    memcpy(&opt, option + 8, 4);
    memcpy(&len, option + 12, 4);
    if (memcmp(option, "IHAVEOPT", 8) != 0 || ntohl(opt) != 1 || ntohl(len) > 4096) {
        fprintf(stderr, "expected EXPORT_NAME\n");
        return 1;
    }
    char name[4096];
    recv_exactly(sock, name, ntohl(len));
    uint64_t be_size = htobe64(size);
    uint16_t transmission_flags = htons(1); // HAS_FLAGS
    send_all(sock, &be_size, 8);
    send_all(sock, &transmission_flags, 2);
    serve_writes(sock, file, spin_us);
    return 0;
}
