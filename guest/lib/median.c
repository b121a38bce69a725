/* The median of a sample set, for guests that report one figure per test on the console
 * (`kvmpy bench ab` reads consoles, not guest memory). */
#include "kvmpy.h"

/* Sorts v[0..n) in place (Shell sort, gaps 1, 4, 13, ...: few instructions, which the
 * emulator charges for) and returns its median: the middle value, or the mean of the
 * middle two (rounded down) for an even count; 0 for no values. */
u32 median_u32(u32 *v, u32 n)
{
    u32 gap = 1;

    if (!n)
        return 0;
    while (gap < n / 3)
        gap = 3 * gap + 1;
    for (; gap; gap /= 3)
        for (u32 i = gap; i < n; i++) {
            u32 x = v[i], j = i;

            for (; j >= gap && v[j - gap] > x; j -= gap)
                v[j] = v[j - gap];
            v[j] = x;
        }
    if (n % 2)
        return v[n / 2];
    return v[n / 2 - 1] / 2 + v[n / 2] / 2 + (v[n / 2 - 1] & v[n / 2] & 1);
}
