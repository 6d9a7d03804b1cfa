/* The protocol's test vectors through the C library, from C: each
 * heartbeat and leave encodes (signed or not) to exactly the vector's
 * bytes, and each ack and status reply decodes to the vector's fields.
 * The vectors come from tests/vectors.json, turned into vectors.h by the
 * test that builds this program (tests/c_device.rs). Prints one line per
 * vector; exits 0 only if all pass. */
#include <stdio.h>
#include <string.h>

#include "presence.h"
#include "vectors.h"

static int failures;

static void check(int ok, int number, const char *what)
{
    printf("vector %d: %s %s\n", number, what, ok ? "ok" : "FAILED");
    if (!ok) {
        failures++;
    }
}

int main(void)
{
    uint8_t out[PRESENCE_MAX_DATAGRAM];
    for (size_t i = 0; i < sizeof HEARTBEATS / sizeof HEARTBEATS[0]; i++) {
        const struct heartbeat_vector *v = &HEARTBEATS[i];
        presence_heartbeat hb = {
            .id = (const uint8_t *)v->id, .id_len = strlen(v->id), .boot = v->boot, .seq = v->seq,
            .interval_ms = v->interval_ms, .flags = v->flags, .payload = v->payload, .payload_len = v->payload_len,
        };
        int32_t len = presence_encode_heartbeat(&hb, v->key, out, sizeof out);
        check(len == (int32_t)v->frame_len && memcmp(out, v->frame, v->frame_len) == 0, v->number,
              v->key ? "signed heartbeat" : "heartbeat");
    }
    for (size_t i = 0; i < sizeof LEAVES / sizeof LEAVES[0]; i++) {
        const struct leave_vector *v = &LEAVES[i];
        int32_t len = presence_encode_leave((const uint8_t *)v->id, strlen(v->id), v->boot, v->seq, NULL, out,
                                            sizeof out);
        check(len == (int32_t)v->frame_len && memcmp(out, v->frame, v->frame_len) == 0, v->number, "leave");
    }
    for (size_t i = 0; i < sizeof ACKS / sizeof ACKS[0]; i++) {
        const struct ack_vector *v = &ACKS[i];
        presence_ack ack;
        int32_t code = presence_decode_ack(v->frame, v->frame_len, &ack);
        check(code == PRESENCE_OK && ack.boot == v->boot && ack.seq == v->seq && ack.interval_ms == v->interval_ms &&
                  ack.ttl_ms == v->ttl_ms,
              v->number, "ack");
    }
    for (size_t i = 0; i < sizeof STATUSES / sizeof STATUSES[0]; i++) {
        const struct status_vector *v = &STATUSES[i];
        presence_status status;
        int32_t code = presence_decode_status(v->frame, v->frame_len, &status);
        int ok = code == PRESENCE_OK && status.request == v->request && status.body == v->body;
        if (ok && v->body == PRESENCE_STATUS_DEVICE) {
            ok = status.device.id_len == strlen(v->device) &&
                 memcmp(status.device.id, v->device, status.device.id_len) == 0 &&
                 status.device.version == v->version && status.device.ttl_ms == v->ttl_ms &&
                 status.device.online == v->online;
        }
        if (ok && v->body == PRESENCE_STATUS_SUMMARY) {
            ok = status.summary.online == v->online_count && status.summary.known == v->known;
        }
        if (ok && v->body == PRESENCE_STATUS_PAGE) {
            presence_device entry;
            ok = status.page_matched == v->matched && status.page_entries == v->entries &&
                 presence_decode_page_entry(v->frame, v->frame_len, 0, &entry) == PRESENCE_OK &&
                 entry.id_len == strlen(v->device) && memcmp(entry.id, v->device, entry.id_len) == 0 &&
                 entry.version == v->version;
        }
        check(ok, v->number, "status");
    }
    /* Every cut of every reply is refused with a code, never a crash. */
    for (size_t i = 0; i < sizeof STATUSES / sizeof STATUSES[0]; i++) {
        const struct status_vector *v = &STATUSES[i];
        int refused = 1;
        for (size_t cut = 0; cut < v->frame_len; cut++) {
            presence_status status;
            refused &= presence_decode_status(v->frame, cut, &status) < 0;
        }
        check(refused, v->number, "status cut short at every length");
    }
    printf("%s\n", failures ? "FAILED" : "all vectors ok");
    return failures != 0;
}
