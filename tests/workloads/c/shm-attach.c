/* shm-attach: holds System V shared memory attached, for the container tests.
 *
 * Segment 0x5160 (3 pages + 100 bytes, so 4 pages mapped) is attached read-write with
 * "first page" at offset 0 and "last page" at 3 pages, then its second page is made
 * read-only (the attachment becomes three mappings); it is attached a second time read-only.
 * Segment 0x5161 (1 page) is attached with "doomed" in it and removed while attached.
 * With the argument "rmid" every segment is removed at once (it lives until the process
 * exits), so a test on the host's namespace leaves nothing behind. Then it waits forever.
 * Prints "ready" once all is in place. Built static by the tests (gcc -static).
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rmid = argc > 1 && strcmp(argv[1], "rmid") == 0;
    int id = shmget(0x5160, 3 * 4096 + 100, IPC_CREAT | 0600);
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
    int doomed = shmget(0x5161, 4096, IPC_CREAT | 0600);
    if (doomed < 0)
        return 5;
    char *r = shmat(doomed, NULL, 0);
    if (r == (void *)-1)
        return 6;
    strcpy(r, "doomed");
    if (shmctl(doomed, IPC_RMID, NULL) != 0)
        return 7;
    if (rmid && shmctl(id, IPC_RMID, NULL) != 0)
        return 8;
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
