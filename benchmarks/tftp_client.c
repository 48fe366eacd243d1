/* The TFTP client of benchmarks/tftp_throughput.py, in C: compiled by the benchmark at run
 * time (gcc -O2) into a temporary directory and used for every server of a run alike.
 *
 * Why C: a windowed transfer is a ping-pong (RFC 7440 §4: the server sends the next window
 * only after the ACK of the last), so the slower end sets the pace. The Python client took
 * longer per window than the servers it measured (py-spy: netboot idle in epoll 35 % of a
 * transfer, the client busy throughout), and no server could look faster than it.
 *
 * What it plays: N read transfers at once, each from its own socket bound to
 * PREFIX.(FIRST + i) (servers limit transfers per address; a storm comes from many), one
 * epoll loop, datagrams taken in batches with recvmmsg. Each transfer is an RFC 1350
 * receiver with RFC 2347 options (blksize RFC 2348, tsize RFC 2349, windowsize RFC 7440):
 *   - the server's TID is the source of its first answer; others are ignored;
 *   - OACK: blksize and windowsize as granted, then ACK 0;
 *   - DATA n+1 in order: kept; ACKed when `windowsize` blocks came since the last ACK, or
 *     when it is the last (shorter than blksize);
 *   - any other DATA (a duplicate or a gap): counted, and the last in-order block ACKed
 *     again, as U-Boot and RFC 1350 clients do (a server must not resend on it: the
 *     Sorcerer's Apprentice guard is the server's to keep);
 *   - no datagram for TIMEOUT seconds: the RRQ or the last ACK is sent again.
 * With -l LOSS a seeded generator per transfer drops that share of the datagrams each way
 * (DATA/OACK received, ACKs sent), the same pattern for every server.
 * With -x FILE each payload is compared with FILE's bytes at its offset (memcmp of the
 * page-cached file: cheaper than hashing), and -o OUT writes transfer 0's bytes to OUT so
 * that the benchmark can compare their SHA-256 with the file's.
 * Every loop is bounded: the run ends after CAP seconds whatever is left.
 *
 * Prints one line "result SECONDS MOVED FAILED DUPLICATES CPU_SECONDS" (CPU: this process,
 * user + system, from the first RRQ on) and one "error I MESSAGE" per failed transfer. Exit 0 unless the
 * arguments or a socket could not be set up (then 2, and a message on stderr).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define TICK_MS 50

struct transfer {
    int fd;
    struct sockaddr_in tid;
    int have_tid;
    unsigned blksize;
    unsigned window;
    uint64_t expected; /* next block wanted, counted from 1 without wrapping */
    unsigned since_ack;
    uint64_t received;
    double last_heard;
    int done;
    char error[160];
    uint64_t duplicates;
    uint64_t rng;
};

static struct {
    struct sockaddr_in server;
    unsigned char rrq[600];
    size_t rrq_len;
    uint64_t size;
    double loss;
    double timeout;
    const unsigned char *expect; /* the file as served, or NULL */
    size_t expect_len;
    int out; /* transfer 0's bytes, or -1 */
} cfg = {.out = -1};

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* splitmix64: a drop pattern, not security-relevant */
static double uniform(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

static int dropped(struct transfer *t) { return cfg.loss > 0 && uniform(&t->rng) < cfg.loss; }

static void ack(struct transfer *t, uint64_t block) {
    unsigned char pkt[4] = {0, 4, (unsigned char)(block >> 8), (unsigned char)block};
    t->since_ack = 0;
    if (dropped(t))
        return;
    /* A full send buffer loses the ACK like the wire would: the timeout resends it. */
    (void)sendto(t->fd, pkt, sizeof pkt, 0, (struct sockaddr *)&t->tid, sizeof t->tid);
}

static void fail(struct transfer *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->error, sizeof t->error, fmt, ap);
    va_end(ap);
    t->done = 1;
}

static unsigned option(const unsigned char *p, size_t n, const char *name, unsigned dflt) {
    /* OACK: opcode, then NUL-terminated name/value pairs */
    size_t i = 2;
    while (i < n) {
        const unsigned char *key = p + i;
        const unsigned char *kend = memchr(key, 0, n - i);
        if (!kend)
            break;
        const unsigned char *val = kend + 1;
        if (val >= p + n)
            break;
        const unsigned char *vend = memchr(val, 0, (size_t)(p + n - val));
        if (!vend)
            break;
        if (strcasecmp((const char *)key, name) == 0)
            return (unsigned)strtoul((const char *)val, NULL, 10);
        i = (size_t)(vend - p) + 1;
    }
    return dflt;
}

static void datagram(struct transfer *t, int index, const unsigned char *p, size_t n,
                     const struct sockaddr_in *src, double heard) {
    if (dropped(t))
        return;
    if (!t->have_tid) {
        t->tid = *src;
        t->have_tid = 1;
    } else if (src->sin_port != t->tid.sin_port || src->sin_addr.s_addr != t->tid.sin_addr.s_addr) {
        return;
    }
    t->last_heard = heard;
    unsigned opcode = n >= 4 ? p[1] : 0;
    if (opcode == 6) { /* OACK */
        if (t->expected == 1) {
            t->blksize = option(p, n, "blksize", 512);
            t->window = option(p, n, "windowsize", 1);
            if (t->window < 1)
                t->window = 1;
            unsigned long long tsize = option(p, n, "tsize", (unsigned)cfg.size);
            if (tsize != cfg.size) {
                fail(t, "tsize %llu, the file has %llu", tsize, (unsigned long long)cfg.size);
                return;
            }
            ack(t, 0);
        }
        return;
    }
    if (opcode == 5) {
        size_t m = n > 4 ? strnlen((const char *)p + 4, n - 4) : 0;
        fail(t, "%.*s", (int)m, (const char *)p + 4);
        return;
    }
    if (opcode != 3)
        return;
    unsigned block = ((unsigned)p[2] << 8) | p[3];
    if (block != (unsigned)(t->expected & 0xFFFF)) {
        t->duplicates++;
        ack(t, t->expected - 1); /* RFC 1350 clients answer every duplicate */
        return;
    }
    size_t payload = n - 4;
    uint64_t offset = (t->expected - 1) * (uint64_t)t->blksize;
    if (cfg.expect) {
        if (payload > t->blksize || offset + payload > cfg.expect_len ||
            memcmp(p + 4, cfg.expect + offset, payload) != 0) {
            fail(t, "block %llu: bytes differ from the file", (unsigned long long)t->expected);
            return;
        }
    }
    if (index == 0 && cfg.out >= 0 && payload &&
        pwrite(cfg.out, p + 4, payload, (off_t)offset) != (ssize_t)payload) {
        fail(t, "cannot write the copy: %s", strerror(errno));
        return;
    }
    t->received += payload;
    t->expected++;
    t->since_ack++;
    if (payload < t->blksize) {
        ack(t, t->expected - 1);
        t->done = 1;
        if (t->received != cfg.size)
            fail(t, "got %llu bytes of %llu", (unsigned long long)t->received,
                 (unsigned long long)cfg.size);
    } else if (t->since_ack >= t->window) {
        ack(t, t->expected - 1);
    }
}

static void tick(struct transfer *t, double at) {
    if (at - t->last_heard < cfg.timeout)
        return;
    t->last_heard = at;
    if (!t->have_tid)
        (void)sendto(t->fd, cfg.rrq, cfg.rrq_len, 0, (struct sockaddr *)&cfg.server,
                     sizeof cfg.server);
    else
        ack(t, t->expected - 1);
}

static void usage(void) {
    die("usage: tftp_client HOST PORT FILE SIZE [-n CLIENTS] [-w WINDOW] [-b BLKSIZE] "
        "[-l LOSS] [-s SEED] [-c CAP] [-t TIMEOUT] [-p PREFIX] [-f FIRST] [-x EXPECT] "
        "[-o OUT]");
}

int main(int argc, char **argv) {
    if (argc < 5)
        usage();
    const char *host = argv[1], *name = argv[3];
    int port = atoi(argv[2]);
    cfg.size = strtoull(argv[4], NULL, 10);
    unsigned clients = 1, window = 1, blksize = 1468, first = 10;
    unsigned long long seed = 1;
    double cap = 150.0;
    const char *prefix = "127.0.0.", *expect = NULL, *out = NULL;
    cfg.timeout = 1.0;
    for (int i = 5; i < argc; i++) {
        if (argv[i][0] != '-' || argv[i][1] == 0 || argv[i][2] != 0 || i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        switch (argv[i - 1][1]) {
        case 'n': clients = (unsigned)atoi(v); break;
        case 'w': window = (unsigned)atoi(v); break;
        case 'b': blksize = (unsigned)atoi(v); break;
        case 'l': cfg.loss = atof(v); break;
        case 's': seed = strtoull(v, NULL, 10); break;
        case 'c': cap = atof(v); break;
        case 't': cfg.timeout = atof(v); break;
        case 'p': prefix = v; break;
        case 'f': first = (unsigned)atoi(v); break;
        case 'x': expect = v; break;
        case 'o': out = v; break;
        default: usage();
        }
    }
    if (clients < 1 || first + clients > 255 || blksize < 8 || blksize > 65464 || window < 1)
        die("bad arguments: clients 1..%u, blksize 8..65464, window >= 1", 255 - first);
    memset(&cfg.server, 0, sizeof cfg.server);
    cfg.server.sin_family = AF_INET;
    cfg.server.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &cfg.server.sin_addr) != 1)
        die("bad host %s", host);
    int len = snprintf((char *)cfg.rrq + 2, sizeof cfg.rrq - 2, "%s%coctet%cblksize%c%u%ctsize%c0%c",
                       name, 0, 0, 0, blksize, 0, 0, 0);
    if (len < 0 || (size_t)len >= sizeof cfg.rrq - 40)
        die("file name too long");
    cfg.rrq[0] = 0;
    cfg.rrq[1] = 1;
    cfg.rrq_len = 2 + (size_t)len;
    if (window > 1)
        cfg.rrq_len += (size_t)snprintf((char *)cfg.rrq + cfg.rrq_len, 40, "windowsize%c%u%c",
                                        0, window, 0);
    if (expect) {
        int efd = open(expect, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (efd < 0 || fstat(efd, &st) < 0)
            die("cannot open %s: %s", expect, strerror(errno));
        cfg.expect_len = (size_t)st.st_size;
        if (cfg.expect_len) {
            cfg.expect = mmap(NULL, cfg.expect_len, PROT_READ, MAP_SHARED | MAP_POPULATE, efd, 0);
            if (cfg.expect == MAP_FAILED)
                die("cannot map %s: %s", expect, strerror(errno));
        }
        close(efd);
    }
    if (out) {
        cfg.out = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (cfg.out < 0)
            die("cannot create %s: %s", out, strerror(errno));
    }

    struct transfer *ts = calloc(clients, sizeof *ts);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!ts || ep < 0)
        die("out of memory or descriptors");
    for (unsigned i = 0; i < clients; i++) {
        struct transfer *t = &ts[i];
        t->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int rcvbuf = 4 << 20;
        setsockopt(t->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        struct sockaddr_in me = {.sin_family = AF_INET};
        char address[64];
        snprintf(address, sizeof address, "%s%u", prefix, first + i);
        if (t->fd < 0 || inet_pton(AF_INET, address, &me.sin_addr) != 1 ||
            bind(t->fd, (struct sockaddr *)&me, sizeof me) < 0)
            die("cannot bind %s: %s", address, strerror(errno));
        t->blksize = 512;
        t->window = 1;
        t->expected = 1;
        t->rng = seed * 1000 + i;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, t->fd, &ev) < 0)
            die("epoll: %s", strerror(errno));
    }

    /* One set of receive buffers for every batch. */
    size_t bufsize = blksize + 516;
    unsigned char *bufs = malloc(BATCH * bufsize);
    struct mmsghdr msgs[BATCH];
    struct iovec iovs[BATCH];
    struct sockaddr_in srcs[BATCH];
    if (!bufs)
        die("out of memory");

    double cpu0 = cpu_seconds();
    double t0 = now();
    for (unsigned i = 0; i < clients; i++) {
        ts[i].last_heard = t0;
        (void)sendto(ts[i].fd, cfg.rrq, cfg.rrq_len, 0, (struct sockaddr *)&cfg.server,
                     sizeof cfg.server);
    }
    unsigned active = clients;
    double last_tick = t0, at = t0;
    struct epoll_event events[256];
    while (active && at - t0 < cap) {
        int ready = epoll_wait(ep, events, 256, TICK_MS);
        double heard = now();
        for (int e = 0; e < ready; e++) {
            unsigned i = events[e].data.u32;
            struct transfer *t = &ts[i];
            for (int rounds = 0; rounds < 64; rounds++) { /* bounded drain of one socket */
                for (int k = 0; k < BATCH; k++) {
                    iovs[k].iov_base = bufs + (size_t)k * bufsize;
                    iovs[k].iov_len = bufsize;
                    msgs[k].msg_hdr = (struct msghdr){.msg_name = &srcs[k],
                                                      .msg_namelen = sizeof srcs[k],
                                                      .msg_iov = &iovs[k],
                                                      .msg_iovlen = 1};
                }
                int got = recvmmsg(t->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                for (int k = 0; k < got; k++) {
                    if (t->done)
                        continue;
                    datagram(t, (int)i, iovs[k].iov_base, msgs[k].msg_len, &srcs[k], heard);
                    if (t->done)
                        active--;
                }
                if (got < BATCH) /* drained: level-triggered epoll says when more come */
                    break;
            }
        }
        at = now();
        if (at - last_tick >= TICK_MS / 1000.0) {
            last_tick = at;
            for (unsigned i = 0; i < clients; i++)
                if (!ts[i].done)
                    tick(&ts[i], at);
        }
    }
    double seconds = now() - t0;
    uint64_t moved = 0, duplicates = 0;
    unsigned failed = 0;
    for (unsigned i = 0; i < clients; i++) {
        moved += ts[i].received;
        duplicates += ts[i].duplicates;
        if (!ts[i].done || ts[i].error[0])
            failed++;
    }
    double cpu = cpu_seconds() - cpu0;
    printf("result %.6f %llu %u %llu %.6f\n", seconds, (unsigned long long)moved, failed,
           (unsigned long long)duplicates, cpu);
    for (unsigned i = 0; i < clients; i++)
        if (ts[i].error[0])
            printf("error %u %s\n", i, ts[i].error);
    return 0;
}
