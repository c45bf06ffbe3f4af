/* credlet's stand-in for the `nnp` program of Kubernetes' nonewprivs test
 * image (test-util/src/critest/images.rs): installed set-uid root, it
 * prints the effective uid it runs with, which is 0 unless no_new_privs
 * kept the set-uid bit from taking effect. Built with `cc -static`. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
