/* Serial output on COM1 (16550: THR at +0, LSR at +5, bit 5 = THR empty) and printf. */
#include "kvmpy.h"

#define LSR_THRE 0x20
#define THRE_POLLS 100000

void putc(char c)
{
    for (u32 i = 0; i < THRE_POLLS && !(inb(COM1_PORT + 5) & LSR_THRE); i++)
        pause();
    outb(COM1_PORT, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static int emit(const char *digits, u32 len, u32 width, int zero, int left, int neg)
{
    u32 total = len + (neg ? 1 : 0);
    u32 pad = width > total ? width - total : 0;
    int n = 0;

    if (neg && zero)
        putc('-'), n++;
    for (; !left && pad; pad--, n++)
        putc(zero ? '0' : ' ');
    if (neg && !zero)
        putc('-'), n++;
    for (u32 i = 0; i < len; i++, n++)
        putc(digits[i]);
    for (; left && pad; pad--, n++)
        putc(' ');
    return n;
}

/* 32-bit values only: the division is a 32-bit DIV, never a libgcc call. */
static u32 format_u32(char *buf, u32 v, u32 base, int upper)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[12];
    u32 n = 0, len = 0;

    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    while (n)
        buf[len++] = tmp[--n];
    return len;
}

/* 64-bit values in hex, by shifts. */
static u32 format_hex64(char *buf, u64 v, int upper)
{
    u32 hi = (u32)(v >> 32), lo = (u32)v, len;

    if (!hi)
        return format_u32(buf, lo, 16, upper);
    len = format_u32(buf, hi, 16, upper);
    for (int shift = 28; shift >= 0; shift -= 4)
        buf[len++] = (upper ? "0123456789ABCDEF" : "0123456789abcdef")[(lo >> shift) & 0xf];
    return len;
}

int vprintf(const char *fmt, va_list ap)
{
    char buf[24];
    int n = 0;

    for (; *fmt; fmt++) {
        int zero = 0, left = 0, longlong = 0, neg = 0;
        u32 width = 0, len;
        const char *s;

        if (*fmt != '%') {
            putc(*fmt);
            n++;
            continue;
        }
        fmt++;
        for (; *fmt == '0' || *fmt == '-'; fmt++) {
            if (*fmt == '0')
                zero = 1;
            else
                left = 1;
        }
        if (left)
            zero = 0;
        for (; *fmt >= '0' && *fmt <= '9'; fmt++)
            width = width * 10 + (u32)(*fmt - '0');
        for (; *fmt == 'l'; fmt++)
            longlong += 1;
        longlong = longlong >= 2;
        switch (*fmt) {
        case 'd':
        case 'i':
            if (longlong) {
                len = format_hex64(buf, va_arg(ap, u64), 0);
            } else {
                s32 v = va_arg(ap, s32);
                neg = v < 0;
                len = format_u32(buf, neg ? 0u - (u32)v : (u32)v, 10, 0);
            }
            n += emit(buf, len, width, zero, left, neg);
            break;
        case 'u':
        case 'x':
        case 'X':
            if (longlong)
                len = format_hex64(buf, va_arg(ap, u64), *fmt == 'X');
            else
                len = format_u32(buf, va_arg(ap, u32), *fmt == 'u' ? 10 : 16, *fmt == 'X');
            n += emit(buf, len, width, zero, left, 0);
            break;
        case 'p':
            puts("0x");
            len = format_u32(buf, (u32)va_arg(ap, void *), 16, 0);
            n += 2 + emit(buf, len, 8, 1, 0, 0);
            break;
        case 'c':
            buf[0] = (char)va_arg(ap, int);
            n += emit(buf, 1, width, 0, left, 0);
            break;
        case 's':
            s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            n += emit(s, strlen(s), width, 0, left, 0);
            break;
        case '%':
            putc('%');
            n++;
            break;
        case '\0':
            return n;
        default:
            putc('%');
            putc(*fmt);
            n += 2;
            break;
        }
    }
    return n;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}
