/* shm-attach: holds System V shared memory attached, for the container tests.
 *
 * A segment of 3 pages + 100 bytes (so 4 pages mapped) is attached read-write with
 * "first page" at offset 0 and "last page" at 3 pages, then its second page is made
 * read-only (the attachment becomes three mappings); it is attached a second time read-only.
 * Modes (the first argument):
 * - "container" (default): the segment has key 0x5160, and segment 0x5161 (1 page) is
 *   attached with "doomed" in it and removed while attached;
 * - "host": the segment is IPC_PRIVATE (nothing else; the test removes it);
 * - "rmid": as "host", then removed at once (it lives until the process exits).
 * Prints "ready" once all is in place, then waits forever. Built static by the tests
 * (gcc -static).
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "container";
    int container = strcmp(mode, "container") == 0;
    int id = shmget(container ? 0x5160 : IPC_PRIVATE, 3 * 4096 + 100, IPC_CREAT | 0600);
    if (id < 0)
        return 1;
    char *p = shmat(id, NULL, 0);
    if (p == (void *)-1)
        return 2;
    strcpy(p, "first page");
    strcpy(p + 3 * 4096, "last page");
    if (mprotect(p + 4096, 4096, PROT_READ) != 0)
        return 3;
    char *q = shmat(id, NULL, SHM_RDONLY);
    if (q == (void *)-1)
        return 4;
    if (container) {
        int doomed = shmget(0x5161, 4096, IPC_CREAT | 0600);
        if (doomed < 0)
            return 5;
        char *r = shmat(doomed, NULL, 0);
        if (r == (void *)-1)
            return 6;
        strcpy(r, "doomed");
        if (shmctl(doomed, IPC_RMID, NULL) != 0)
            return 7;
    }
    if (strcmp(mode, "rmid") == 0 && shmctl(id, IPC_RMID, NULL) != 0)
        return 8;
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
