/* The web server of credlet's stand-ins for critest's nginx and httpd
 * images (test-util/src/critest/images.rs): answers every HTTP request with
 * 200 and a small page. Configured by the image's environment:
 *   WEB_LISTEN   address:port to listen on (default 0.0.0.0:80);
 *   WEB_PIDFILE  file to write its pid to (nginx's /var/run/nginx.pid);
 *   WEB_TITLE    the command line to show in /proc/<pid>/cmdline: the
 *                program re-executes itself once with it as argv[0], as
 *                nginx's master process retitles itself ("nginx: master
 *                process ..."); the process name stays the file's name.
 * Logs one line naming itself (critest looks for "httpd" in the log),
 * exits 0 on SIGTERM/SIGINT/SIGQUIT (it runs as PID 1). Built with
 * `cc -static`. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void on_stop(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = 0;
    const char *title = getenv("WEB_TITLE");
    if (title && *title && n > 0 && (argc < 1 || strcmp(argv[0], title) != 0)) {
        char *args[] = {(char *)title, 0};
        execv(self, args);
        perror("re-exec with the process title");
    }

    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, 0);
    sigaction(SIGINT, &sa, 0);
    sigaction(SIGQUIT, &sa, 0);
    signal(SIGPIPE, SIG_IGN);

    const char *listen_on = getenv("WEB_LISTEN");
    if (!listen_on || !*listen_on)
        listen_on = "0.0.0.0:80";
    char host[64];
    const char *colon = strrchr(listen_on, ':');
    if (!colon || (size_t)(colon - listen_on) >= sizeof host) {
        fprintf(stderr, "WEB_LISTEN %s is not address:port\n", listen_on);
        return 2;
    }
    memcpy(host, listen_on, colon - listen_on);
    host[colon - listen_on] = 0;
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "WEB_LISTEN %s: bad address\n", listen_on);
        return 2;
    }

    const char *pidfile = getenv("WEB_PIDFILE");
    if (pidfile && *pidfile) {
        FILE *f = fopen(pidfile, "w");
        if (!f) {
            perror(pidfile);
            return 1;
        }
        fprintf(f, "%d\n", (int)getpid());
        fclose(f);
    }

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(s, 64) != 0) {
        perror(listen_on);
        return 1;
    }
    const char *name = strrchr(self, '/');
    printf("%s: credlet stand-in serving HTTP on %s\n", name ? name + 1 : "web", listen_on);
    fflush(stdout);

    static const char page[] = "<!DOCTYPE html>\n<html><body><h1>It works!</h1></body></html>\n";
    char response[512];
    int len = snprintf(response, sizeof response,
                       "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %zu\r\n"
                       "Connection: close\r\n\r\n%s",
                       sizeof page - 1, page);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0)
            continue;
        char buf[4096];
        /* One read: the request line and headers of a GET fit. */
        if (read(c, buf, sizeof buf) > 0) {
            ssize_t off = 0;
            while (off < len) {
                ssize_t w = write(c, response + off, len - off);
                if (w <= 0)
                    break;
                off += w;
            }
        }
        close(c);
    }
}
