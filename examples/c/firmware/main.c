/* A bare-metal device in C on the presence C library: it encodes a signed
 * heartbeat that asks for an ack, "sends" it (a fake network that keeps
 * the frame), decodes the ack the fake network answers with, then the
 * leave. Built for a Cortex-M4F with arm-none-eabi-gcc and newlib-nano,
 * linked against libpresence_ffi.a with section garbage collection (see
 * the Makefile). Under QEMU (make run) it reports over semihosting what it
 * did and how much stack it used. */
#include <stddef.h>
#include <stdint.h>

#include "presence.h"

/* The device key (from `presence derive-key`); in real firmware it lives
 * in a protected flash page. This one is the test vectors' key of
 * "sensor-00042", so the frame can be checked against PROTOCOL.md. */
static const uint8_t device_key[PRESENCE_KEY_LEN] = {
    0x22, 0x35, 0x4f, 0xb3, 0x5f, 0x62, 0x7d, 0x17, 0x06, 0xba, 0x71, 0xae, 0x06, 0x99, 0xf3, 0x7f,
    0x4e, 0x12, 0x68, 0x19, 0x5e, 0x44, 0xe2, 0xca, 0x6d, 0x4b, 0x91, 0xac, 0xa1, 0xd4, 0x81, 0x36,
};
static const char device_id[] = "sensor-00042";

/* The one frame buffer: heartbeats and the leave are encoded into it and
 * sent from it (a network driver would DMA it out). Sized for this device:
 * a signed heartbeat of its 12-byte id is 31 bytes, with room for 16 bytes
 * of payload; PRESENCE_MAX_HEARTBEAT_LEN (157) fits any id and payload. */
#define FRAME_CAP 48
static uint8_t frame[FRAME_CAP];

/* The fake network: it reads every byte sent, as a driver would, and keeps
 * the length and a checksum. */
static volatile size_t tx_len;
static volatile uint32_t tx_sum;

static void net_send(const uint8_t *bytes, size_t len)
{
    uint32_t sum = 0;
    for (size_t i = 0; i < len; i++) {
        sum = sum * 31 + bytes[i];
    }
    tx_sum = sum;
    tx_len = len;
}

/* The server's ack of (boot 1000, seq 1): PROTOCOL.md's encoding of
 * Ack {boot, seq, interval_ms: 10000, ttl_ms: 30000}. */
static size_t net_receive(uint8_t *buf, size_t cap)
{
    static const uint8_t ack[] = {0x01, 0x04, 0xe8, 0x07, 0x01, 0x90, 0x4e, 0xb0, 0xea, 0x01};
    size_t n = sizeof ack < cap ? sizeof ack : cap;
    for (size_t i = 0; i < n; i++) {
        buf[i] = ack[i];
    }
    return n;
}

/* Semihosting (QEMU, or a debugger): print a line, exit. */
static void semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
}

static void print(const char *s)
{
    semihost(0x04, s); /* SYS_WRITE0 */
}

static void print_number(const char *label, uint32_t n)
{
    char line[48];
    size_t i = 0;
    while (label[i] != 0 && i < 32) {
        line[i] = label[i];
        i++;
    }
    char digits[10];
    size_t d = 0;
    do {
        digits[d++] = (char)('0' + n % 10);
        n /= 10;
    } while (n != 0);
    while (d > 0) {
        line[i++] = digits[--d];
    }
    line[i++] = '\n';
    line[i] = 0;
    print(line);
}

uint32_t stack_used(void);

/* One heartbeat and its ack; 0 if the ack is the one expected. */
static int beat(uint32_t boot, uint32_t seq)
{
    presence_heartbeat hb = {
        .id = (const uint8_t *)device_id,
        .id_len = sizeof device_id - 1,
        .boot = boot,
        .seq = seq,
        .interval_ms = 10000,
        .flags = PRESENCE_FLAG_ACK,
        .payload = NULL,
        .payload_len = 0,
    };
    int32_t len = presence_encode_heartbeat(&hb, device_key, frame, sizeof frame);
    if (len < 0) {
        print(presence_strerror(len));
        return 1;
    }
    net_send(frame, (size_t)len);
    uint8_t reply[24]; /* an ack is at most 22 bytes */
    size_t n = net_receive(reply, sizeof reply);
    presence_ack ack;
    int32_t decoded = presence_decode_ack(reply, n, &ack);
    if (decoded != PRESENCE_OK) {
        print(presence_strerror(decoded));
        return 1;
    }
    if (ack.boot != boot || ack.seq != seq || ack.ttl_ms != 30000) {
        print("ack for another heartbeat\n");
        return 1;
    }
    return 0;
}

int main(void)
{
    int failed = beat(1000, 1);
    print_number("heartbeat bytes: ", (uint32_t)tx_len);
    int32_t len = presence_encode_leave((const uint8_t *)device_id, sizeof device_id - 1, 1000, 2, device_key,
                                        frame, sizeof frame);
    if (len < 0) {
        failed = 1;
    } else {
        net_send(frame, (size_t)len);
        print_number("leave bytes: ", (uint32_t)tx_len);
    }
    print_number("stack used (bytes): ", stack_used());
    print(failed ? "FAILED\n" : "ok: heartbeat signed, ack decoded, leave signed\n");
    /* SYS_EXIT: on 32-bit Arm the reason itself, ADP_Stopped_ApplicationExit
     * (0x20026) for success, ADP_Stopped_RunTimeErrorUnknown otherwise. */
    semihost(0x18, (const void *)(failed ? 0x20023u : 0x20026u));
    return failed;
}
