/* A device in C for POSIX systems, on the presence C library: it beats to
 * a server over UDP, asks for acks and reads them, and says goodbye with a
 * leave on SIGINT or SIGTERM.
 *
 *   cargo build -p presence-ffi --release
 *   cc -O2 -Wall -Iffi/include examples/c/device.c target/release/libpresence_ffi.a \
 *      -lpthread -ldl -lm -o device
 *   ./device 127.0.0.1:7787 boiler-7 [--interval-ms 5000] [--payload TEXT] [--key HEX] [--count N]
 *
 * --key takes the device key in hex (`presence derive-key --id boiler-7`);
 * without it the heartbeats are unsigned. Each ack is printed as
 * "ack seq=N interval_ms=I ttl_ms=T". The boot epoch is the Unix time at
 * start, so two runs are never replays of each other (real firmware keeps
 * a counter in flash). */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "presence.h"

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static int parse_key(const char *hex, uint8_t key[PRESENCE_KEY_LEN])
{
    if (strlen(hex) != 2 * PRESENCE_KEY_LEN) {
        return -1;
    }
    for (size_t i = 0; i < PRESENCE_KEY_LEN; i++) {
        unsigned int byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) {
            return -1;
        }
        key[i] = (uint8_t)byte;
    }
    return 0;
}

/* A UDP socket connected to HOST:PORT. */
static int connect_to(const char *server)
{
    char host[256];
    const char *colon = strrchr(server, ':');
    if (colon == NULL || (size_t)(colon - server) >= sizeof host) {
        fprintf(stderr, "server must be HOST:PORT, not '%s'\n", server);
        return -1;
    }
    memcpy(host, server, (size_t)(colon - server));
    host[colon - server] = 0;
    struct addrinfo hints = {.ai_socktype = SOCK_DGRAM}, *found;
    int err = getaddrinfo(host, colon + 1, &hints, &found);
    if (err != 0) {
        fprintf(stderr, "cannot resolve %s: %s\n", server, gai_strerror(err));
        return -1;
    }
    int fd = socket(found->ai_family, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, found->ai_addr, found->ai_addrlen) != 0) {
        perror("socket");
        freeaddrinfo(found);
        return -1;
    }
    freeaddrinfo(found);
    return fd;
}

/* Waits up to `ms` for an ack of (boot, seq) and prints it; 1 if one came. */
static int await_ack(int fd, uint32_t boot, uint32_t seq, int ms)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    uint8_t reply[PRESENCE_MAX_DATAGRAM];
    while (!stopping && poll(&pfd, 1, ms) > 0) {
        ssize_t n = recv(fd, reply, sizeof reply, 0);
        if (n < 0) {
            return 0;
        }
        presence_ack ack;
        int32_t code = presence_decode_ack(reply, (size_t)n, &ack);
        if (code != PRESENCE_OK) {
            fprintf(stderr, "ignored a reply: %s\n", presence_strerror(code));
            continue;
        }
        if (ack.boot == boot && ack.seq == seq) {
            printf("ack seq=%u interval_ms=%u ttl_ms=%u\n", ack.seq, ack.interval_ms, ack.ttl_ms);
            fflush(stdout);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr,
                "usage: %s HOST:PORT DEVICE-ID [--interval-ms N] [--payload TEXT] [--key HEX] [--count N]\n",
                argv[0]);
        return 2;
    }
    const char *server = argv[1], *id = argv[2], *payload = "";
    uint32_t interval_ms = 5000;
    long count = -1;
    uint8_t key[PRESENCE_KEY_LEN];
    const uint8_t *signing_key = NULL;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--interval-ms") == 0) {
            interval_ms = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        } else if (strcmp(argv[i], "--payload") == 0) {
            payload = argv[i + 1];
        } else if (strcmp(argv[i], "--count") == 0) {
            count = strtol(argv[i + 1], NULL, 10);
        } else if (strcmp(argv[i], "--key") == 0) {
            if (parse_key(argv[i + 1], key) != 0) {
                fprintf(stderr, "--key takes %d hex digits (presence derive-key prints them)\n",
                        2 * PRESENCE_KEY_LEN);
                return 2;
            }
            signing_key = key;
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    int fd = connect_to(server);
    if (fd < 0) {
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    uint32_t boot = (uint32_t)time(NULL), seq = 0;
    uint8_t frame[PRESENCE_MAX_HEARTBEAT_LEN];
    printf("beating as '%s' to %s every %u ms (boot %u, %s)\n", id, server, interval_ms, boot,
           signing_key ? "signed" : "unsigned");
    fflush(stdout);
    while (!stopping && count != 0) {
        presence_heartbeat hb = {
            .id = (const uint8_t *)id,
            .id_len = strlen(id),
            .boot = boot,
            .seq = ++seq,
            .interval_ms = interval_ms,
            .flags = PRESENCE_FLAG_ACK,
            .payload = (const uint8_t *)payload,
            .payload_len = strlen(payload),
        };
        int32_t len = presence_encode_heartbeat(&hb, signing_key, frame, sizeof frame);
        if (len < 0) {
            fprintf(stderr, "cannot encode the heartbeat: %s\n", presence_strerror(len));
            return 2;
        }
        if (send(fd, frame, (size_t)len, 0) < 0) {
            fprintf(stderr, "send: %s\n", strerror(errno));
        }
        if (count > 0) {
            count--;
        }
        /* The ack comes within the interval or not at all; then wait out the rest. */
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        await_ack(fd, boot, seq, (int)interval_ms);
        for (;;) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
            if (stopping || elapsed >= (long)interval_ms) {
                break;
            }
            struct timespec rest = {.tv_sec = 0, .tv_nsec = 10 * 1000000L};
            nanosleep(&rest, NULL);
        }
    }
    if (stopping) {
        int32_t len = presence_encode_leave((const uint8_t *)id, strlen(id), boot, ++seq, signing_key, frame,
                                            sizeof frame);
        if (len > 0 && send(fd, frame, (size_t)len, 0) == len) {
            printf("left (seq %u)\n", seq);
        }
    }
    close(fd);
    return 0;
}
