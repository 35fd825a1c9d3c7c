/*
 * connrate: new TCP connections per second, for natgwd's comparative benchmark.
 *
 *   connrate server PORT
 *       accept loop on 0.0.0.0:PORT: accept and close at once (a FIN; the client's RST
 *       that follows leaves no TIME_WAIT on either side); runs until killed.
 *   connrate client ADDRESS PORT SECONDS [CONCURRENCY]
 *       keeps CONCURRENCY non-blocking connects in flight (one epoll thread); each one
 *       that completes the three-way handshake is counted and closed with SO_LINGER 0
 *       (RST: no TIME_WAIT, so the local ports recycle), then replaced. Prints one JSON
 *       line: {"connections": N, "errors": E, "timeouts": T, "seconds": S, "rate": R}.
 *
 * A connection that does not complete within 1 s (a SYN lost, the accept queue full) is
 * dropped and counted as a timeout, so the kernel's 1 s SYN retransmission never stalls
 * a slot for long. Compiled at run time by the benchmark (gcc -O2).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONCURRENCY 1024
#define CONNECT_TIMEOUT_NS 1000000000LL

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void abort_close(int fd) {
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static int server(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 65535) < 0) {
        perror("bind/listen");
        return 1;
    }
    printf("listening %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
                continue;
            perror("accept");
            return 1;
        }
        close(c);
    }
}

struct slot {
    int fd;
    long long started;
};

static int open_slot(struct slot *s, int ep, const struct sockaddr_in *dst, long long *errors) {
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) {
            perror("socket");
            return -1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, (const struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS) {
            (*errors)++;
            close(fd);
            if (errno == EADDRNOTAVAIL)
                usleep(1000); /* out of local ports: let some be released */
            continue;
        }
        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        s->fd = fd;
        s->started = now_ns();
        return 0;
    }
}

static int client(const char *address, int port, double seconds, int concurrency) {
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, address, &dst.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", address);
        return 2;
    }
    if (concurrency < 1 || concurrency > MAX_CONCURRENCY)
        concurrency = 32;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    static struct slot slots[MAX_CONCURRENCY];
    long long connections = 0, errors = 0, timeouts = 0;
    long long start = now_ns(), deadline = start + (long long)(seconds * 1e9);
    for (int i = 0; i < concurrency; i++)
        if (open_slot(&slots[i], ep, &dst, &errors) < 0)
            return 1;
    struct epoll_event events[MAX_CONCURRENCY];
    long long now = start;
    long long last_sweep = start;
    while (now < deadline) {
        int n = epoll_wait(ep, events, concurrency, 10);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0 && !(events[i].events & EPOLLERR))
                connections++;
            else
                errors++;
            epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
            abort_close(s->fd);
            if (open_slot(s, ep, &dst, &errors) < 0)
                return 1;
        }
        if (now - last_sweep > 100000000LL) { /* every 100 ms: drop connects stuck on a lost SYN */
            last_sweep = now;
            for (int i = 0; i < concurrency; i++) {
                if (now - slots[i].started > CONNECT_TIMEOUT_NS) {
                    timeouts++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, slots[i].fd, NULL);
                    abort_close(slots[i].fd);
                    if (open_slot(&slots[i], ep, &dst, &errors) < 0)
                        return 1;
                }
            }
        }
    }
    double elapsed = (now - start) / 1e9;
    printf("{\"connections\": %lld, \"errors\": %lld, \"timeouts\": %lld, \"seconds\": %.4f, \"rate\": %.1f}\n",
           connections, errors, timeouts, elapsed, connections / elapsed);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && strcmp(argv[1], "server") == 0)
        return server(atoi(argv[2]));
    if (argc >= 5 && strcmp(argv[1], "client") == 0)
        return client(argv[2], atoi(argv[3]), atof(argv[4]), argc >= 6 ? atoi(argv[5]) : 32);
    fprintf(stderr, "usage: %s server PORT | client ADDRESS PORT SECONDS [CONCURRENCY]\n", argv[0]);
    return 2;
}
