/* Minimal Cortex-M startup: the vector table, and a reset handler that
 * copies .data, zeroes .bss, paints the stack (so main can measure how
 * much of it was used) and calls main. No C library start-up code. */
#include <stdint.h>

extern uint32_t _data_load[], _data_start[], _data_end[], _bss_start[], _bss_end[];
extern uint32_t _stack_bottom[], _stack_top[];

int main(void);

/* Every word of the stack starts as this; a word that still holds it at the
 * end was never used. */
#define STACK_PAINT 0x5ca1ab1eu

void reset_handler(void)
{
    uint32_t *src = _data_load;
    for (uint32_t *dst = _data_start; dst < _data_end;) {
        *dst++ = *src++;
    }
    for (uint32_t *dst = _bss_start; dst < _bss_end;) {
        *dst++ = 0;
    }
    /* Paint everything below the current stack pointer (the reset
     * handler's own frame, a few words, is above it and counts as used).
     * This loop keeps its variables in registers and calls nothing. */
    uint32_t *sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (uint32_t *p = _stack_bottom; p < sp; p++) {
        *p = STACK_PAINT;
    }
    main();
    for (;;) {
    }
}

static void default_handler(void)
{
    for (;;) {
    }
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))_stack_top, /* initial stack pointer */
    reset_handler,
    default_handler, /* NMI */
    default_handler, /* HardFault */
    default_handler, default_handler, default_handler, 0, 0, 0, 0,
    default_handler, /* SVCall */
    default_handler, 0,
    default_handler, /* PendSV */
    default_handler, /* SysTick */
};

/* How many bytes of the stack were ever used: from the top down to the
 * lowest word that no longer holds the paint. */
uint32_t stack_used(void)
{
    const uint32_t *p = _stack_bottom;
    while (p < _stack_top && *p == STACK_PAINT) {
        p++;
    }
    return (uint32_t)((const uint8_t *)_stack_top - (const uint8_t *)p);
}
