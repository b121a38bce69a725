/* The few libc string functions gcc may call even in freestanding code, and the
 * command-line helpers. */
#include "kvmpy.h"

void *memset(void *s, int c, size_t n)
{
    u8 *p = s;

    while (n--)
        *p++ = (u8)c;
    return s;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;

    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;

    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;

    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;

    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

const char *mbi_cmdline(const struct multiboot_info *mbi)
{
    if (!(mbi->flags & MBI_FLAG_CMDLINE) || !mbi->cmdline)
        return "";
    return (const char *)mbi->cmdline;
}

const char *cmdline_value(const char *cmdline, const char *key)
{
    size_t klen = strlen(key);
    const char *p = cmdline;

    while (*p) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, klen) && p[klen] == '=')
            return p + klen + 1;
        while (*p && *p != ' ')
            p++;
    }
    return NULL;
}

u32 parse_u32(const char *s)
{
    u32 v = 0;

    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2;; s++) {
            u32 d;
            if (*s >= '0' && *s <= '9')
                d = (u32)(*s - '0');
            else if (*s >= 'a' && *s <= 'f')
                d = (u32)(*s - 'a' + 10);
            else if (*s >= 'A' && *s <= 'F')
                d = (u32)(*s - 'A' + 10);
            else
                return v;
            v = (v << 4) | d;
        }
    }
    for (; *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (u32)(*s - '0');
    return v;
}
