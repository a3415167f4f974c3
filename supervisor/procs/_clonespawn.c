/*
 * Start a process the way posix_spawn does, but born inside a cgroup.
 *
 * The child is created with clone3(CLONE_VM | CLONE_VFORK): it runs on a
 * stack of its own in the parent's memory, so nothing is copied, and the
 * calling thread sleeps until the child has exec'd or died. That stack is a
 * buffer in the calling thread's own frame, free to lend while it sleeps: no
 * mmap and munmap (tens of microseconds) per spawn. With
 * CLONE_INTO_CGROUP (Linux >= 5.7) the kernel places the child in the cgroup
 * at creation. Joining a cgroup afterwards (writing cgroup.procs) waits for an
 * RCU grace period, milliseconds on an idle host; being born there does not.
 *
 * Between clone and exec the child only calls async-signal-safe functions and
 * touches no memory but the `spawn_job` the parent prepared. Loaded with
 * ctypes by supervisor/clonespawn.py; built by hatch_build.py.
 *
 * Everything the child does before exec is time the parent sleeps, so the
 * child does as little as it can: the kernel resets the signal handlers
 * (CLONE_CLEAR_SIGHAND, Linux >= 5.5) and the parent works out the start time.
 *
 * A child created without CLONE_FILES gets a copy of the parent's whole fd
 * table, every open file referenced and then closed again before exec: a cost
 * that grows with the daemon's open fds (one stderr file per instance, one
 * socket per client). Given `keep_below`, the child is created sharing the
 * parent's table instead (CLONE_FILES) and its first step is
 * close_range(keep_below, ~0, CLOSE_RANGE_UNSHARE) (Linux >= 5.9), which gives
 * it a table of its own holding only the fds below `keep_below`: the parent
 * puts the child's stdio there beforehand.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* <linux/sched.h>, spelled out so the build needs no kernel headers. */
#define SPAWN_CLONE_VM 0x00000100ULL
#define SPAWN_CLONE_VFORK 0x00004000ULL
#define SPAWN_CLONE_FILES 0x00000400ULL
#define SPAWN_CLONE_CLEAR_SIGHAND 0x100000000ULL
#define SPAWN_CLONE_INTO_CGROUP 0x200000000ULL
#define SPAWN_SYS_CLONE3 435
#define SPAWN_SYS_CLOSE_RANGE 436
#define SPAWN_CLOSE_RANGE_UNSHARE (1U << 1)

/* The child's stack. It holds child_main's few locals and the frames of the
   system call wrappers it calls (nothing of the program it execs, which gets
   a new memory), taken from the calling thread's stack (8 MiB for Python's
   threads). */
#define CHILD_STACK_BYTES (32 * 1024)

/* Where a failed spawn failed; mirrored in clonespawn.py. */
enum spawn_stage {
    STAGE_NONE = 0,
    STAGE_CLONE = 1,
    STAGE_SESSION = 2,
    STAGE_STDIO = 3,
    STAGE_CLOSE_FDS = 4,
    STAGE_CWD = 5,
    STAGE_EXEC = 6,
    STAGE_RLIMIT = 7,
    STAGE_NO_NEW_PRIVS = 8,
    STAGE_SETGROUPS = 9,
    STAGE_SETGID = 10,
    STAGE_SETUID = 11,
};

struct clone_args_v2 {
    uint64_t flags;
    uint64_t pidfd;
    uint64_t child_tid;
    uint64_t parent_tid;
    uint64_t exit_signal;
    uint64_t stack;
    uint64_t stack_size;
    uint64_t tls;
    uint64_t set_tid;
    uint64_t set_tid_size;
    uint64_t cgroup;
};

/*
 * Who the child becomes and what bounds it, applied after chdir and before
 * exec (mirrored in clonespawn.py). Limits and umask first, while the child
 * may still raise a hard limit; then the groups, the gid and the uid last, so
 * that every earlier step still has the privileges it needs.
 */
struct spawn_limit {
    int resource;
    struct rlimit value;
};

struct spawn_identity {
    /* 1: setgroups(groups), setresgid(gid), setresuid(uid); 0: keep the parent's. */
    int switch_ids;
    unsigned int uid;
    unsigned int gid;
    int ngroups;
    const unsigned int *groups;
    int umask; /* -1: keep the parent's */
    int nlimits;
    const struct spawn_limit *limits;
    int no_new_privs;
};

struct spawn_job {
    char *const *paths; /* executable candidates, in order, NULL-terminated */
    char *const *argv;
    char *const *envp;
    const char *cwd; /* NULL: the parent's */
    int stdio[3];
    /* > 0: the child shares the parent's fd table until it unshares it,
       keeping only the fds below this. */
    int keep_below;
    int new_session;
    /* 1 when the kernel did not clear the signal handlers (no
       CLONE_CLEAR_SIGHAND): the child resets them itself. */
    int reset_handlers;
    const struct spawn_identity *identity; /* NULL: nothing to change */
    /* Written by the child when it fails; read by the parent once it wakes. */
    int error;
    int stage;
    /* Which limit failed (STAGE_RLIMIT): its index in identity->limits. */
    int failed_index;
};

/* A CLOCK_BOOTTIME reading in /proc/<pid>/stat's unit: whole clock ticks. */
static unsigned long long boot_ticks(const struct timespec *time, unsigned long long tick_ns) {
    return (unsigned long long)time->tv_sec * (1000000000ULL / tick_ns) + (unsigned long long)time->tv_nsec / tick_ns;
}

static void child_fail(struct spawn_job *job, int stage, int error) {
    job->error = error;
    job->stage = stage;
    _exit(127);
}

/* The identity and limits of `identity`. The ids change through the raw
   system calls: glibc's setuid and friends change every thread of the
   calling process (a signal to each), and this child shares the parent's
   memory, where glibc's list of threads is the parent's. */
static void child_become(struct spawn_job *job, const struct spawn_identity *identity) {
    for (int i = 0; i < identity->nlimits; i++) {
        if (setrlimit(identity->limits[i].resource, &identity->limits[i].value) != 0) {
            job->failed_index = i;
            child_fail(job, STAGE_RLIMIT, errno);
        }
    }
    if (identity->umask >= 0) {
        umask((mode_t)identity->umask);
    }
    if (identity->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0) {
        child_fail(job, STAGE_NO_NEW_PRIVS, errno);
    }
    if (!identity->switch_ids) {
        return;
    }
    if (syscall(SYS_setgroups, (size_t)identity->ngroups, identity->groups) != 0) {
        child_fail(job, STAGE_SETGROUPS, errno);
    }
    if (syscall(SYS_setresgid, identity->gid, identity->gid, identity->gid) != 0) {
        child_fail(job, STAGE_SETGID, errno);
    }
    if (syscall(SYS_setresuid, identity->uid, identity->uid, identity->uid) != 0) {
        child_fail(job, STAGE_SETUID, errno);
    }
}

static int child_main(void *arg) {
    struct spawn_job *job = arg;
    sigset_t none;
    int source[3];
    int error = 0;

    struct sigaction reset = {0};

    /* A caught signal must not run the parent's handler in this child, which
       shares the parent's memory: back to the default action before signals
       are unblocked. CLONE_CLEAR_SIGHAND did that already, unless the kernel
       is too old for it. SIGPIPE and SIGXFSZ, which Python ignores, are
       restored too, as subprocess does. */
    /* First of all, while it still shares the parent's fd table: a table of
       its own, with only the fds the parent placed below keep_below. */
    if (job->keep_below > 0
        && syscall(SPAWN_SYS_CLOSE_RANGE, (unsigned int)job->keep_below, ~0U, SPAWN_CLOSE_RANGE_UNSHARE) != 0) {
        child_fail(job, STAGE_CLOSE_FDS, errno);
    }

    reset.sa_handler = SIG_DFL;
    if (job->reset_handlers) {
        for (int sig = 1; sig < NSIG; sig++) {
            struct sigaction action;
            if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &action) != 0) {
                continue;
            }
            if (action.sa_handler != SIG_DFL && action.sa_handler != SIG_IGN) {
                sigaction(sig, &reset, NULL);
            }
        }
    }
    sigaction(SIGPIPE, &reset, NULL);
    sigaction(SIGXFSZ, &reset, NULL);

    if (job->new_session && setsid() < 0) {
        child_fail(job, STAGE_SESSION, errno);
    }

    /* Sources below 3 would be overwritten by the dup2 of another: move them up. */
    for (int i = 0; i < 3; i++) {
        source[i] = job->stdio[i];
        if (source[i] >= 0 && source[i] < 3) {
            source[i] = fcntl(source[i], F_DUPFD_CLOEXEC, 3);
            if (source[i] < 0) {
                child_fail(job, STAGE_STDIO, errno);
            }
        }
    }
    for (int i = 0; i < 3; i++) {
        if (source[i] >= 0 && dup2(source[i], i) < 0) {
            child_fail(job, STAGE_STDIO, errno);
        }
    }
    if (syscall(SPAWN_SYS_CLOSE_RANGE, 3U, ~0U, 0U) != 0) {
        child_fail(job, STAGE_CLOSE_FDS, errno);
    }
    if (job->cwd != NULL && chdir(job->cwd) != 0) {
        child_fail(job, STAGE_CWD, errno);
    }
    if (job->identity != NULL) {
        child_become(job, job->identity);
    }

    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    /* Like execvpe: the first failure that is not "no such file here" wins. */
    for (char *const *path = job->paths; *path != NULL; path++) {
        execve(*path, job->argv, job->envp);
        if (errno != ENOENT && errno != ENOTDIR && error == 0) {
            error = errno;
        }
    }
    child_fail(job, STAGE_EXEC, error != 0 ? error : ENOENT);
    return 127;
}

/* clone3 with a child that runs fn(arg) on its own stack. No C library wraps
   clone3 (glibc 2.36), and a child on a new stack cannot return through the
   parent's frames, so the child's first steps are written out per machine. */
static long clone3_run(struct clone_args_v2 *args, int (*fn)(void *), void *arg) {
#if defined(__x86_64__)
    long result;
    register void *function __asm__("r12") = (void *)fn;
    register void *argument __asm__("r13") = arg;
    __asm__ volatile(
        "syscall\n\t"
        "testq %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        /* The child: a fresh, 16-byte aligned stack; no frame to return to. */
        "xorl %%ebp, %%ebp\n\t"
        "movq %%r13, %%rdi\n\t"
        "callq *%%r12\n\t"
        "movl %%eax, %%edi\n\t"
        "movl $60, %%eax\n\t" /* SYS_exit */
        "syscall\n\t"
        "hlt\n"
        "1:\n\t"
        : "=a"(result)
        : "0"((long)SPAWN_SYS_CLONE3), "D"(args), "S"(sizeof *args), "r"(function), "r"(argument)
        : "rcx", "r11", "memory");
    if (result < 0) {
        errno = (int)-result;
        return -1;
    }
    return result;
#else
    (void)args;
    (void)fn;
    (void)arg;
    errno = ENOSYS;
    return -1;
#endif
}

/* The calling convention of adapter_spawn; clonespawn.py refuses a library
   built from another (a stale build), and spawns with subprocess instead. */
int adapter_spawn_abi(void) {
    return 3;
}

/*
 * Spawn argv with envp, trying each of `paths` as the executable. stdio[i] is
 * dup'ed onto fd i (-1: left as inherited); every other fd is closed in the
 * child. cgroup_fd >= 0 is an O_DIRECTORY fd of the cgroup to be born in.
 * keep_below > 0: the child shares the fd table until it unshares it keeping
 * only the fds below keep_below (see above); every stdio[i] must be below it.
 * A kernel without CLOSE_RANGE_UNSHARE fails that with STAGE_CLOSE_FDS, EINVAL.
 *
 * `identity` (NULL: none) is applied after chdir, before exec; a failed
 * setrlimit leaves the index of its limit in *failed_index.
 *
 * Returns the child's pid once it has exec'd, with its start time in
 * *start_time (0 if it could not be read). On failure returns -1 with
 * *stage and *error set; a child that failed before exec has been reaped.
 * STAGE_CLONE means no child ever existed (ENOSYS, EPERM from a seccomp
 * filter, EINVAL from an old kernel: the caller may fall back).
 */
long adapter_spawn(char *const *paths, char *const *argv, char *const *envp, const char *cwd, const int *stdio,
                   int cgroup_fd, int keep_below, int new_session, const struct spawn_identity *identity,
                   int *stage, int *error, int *failed_index, unsigned long long *start_time) {
    struct spawn_job job = {
        .paths = paths,
        .argv = argv,
        .envp = envp,
        .cwd = cwd,
        .stdio = {stdio[0], stdio[1], stdio[2]},
        .keep_below = keep_below,
        .new_session = new_session,
        .reset_handlers = 0,
        .identity = identity,
        .error = 0,
        .stage = STAGE_NONE,
        .failed_index = -1,
    };
    struct clone_args_v2 args = {0};
    _Alignas(16) unsigned char stack[CHILD_STACK_BYTES];
    sigset_t all, previous;
    struct timespec before, after;
    long ticks_per_second;
    long pid;
    int clone_error;

    args.flags = SPAWN_CLONE_VM | SPAWN_CLONE_VFORK | SPAWN_CLONE_CLEAR_SIGHAND;
    if (keep_below > 0) {
        args.flags |= SPAWN_CLONE_FILES;
    }
    if (cgroup_fd >= 0) {
        args.flags |= SPAWN_CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cgroup_fd;
    }
    args.exit_signal = SIGCHLD;
    args.stack = (uint64_t)(uintptr_t)stack;
    args.stack_size = CHILD_STACK_BYTES;

    /* No handler may run in the child before it has reset them all.
       sigprocmask, not pthread_sigmask: with glibc on Linux both set the
       calling thread's mask alone (and keep glibc's internal signals
       unblocked), but pthread_sigmask is in libc only since glibc 2.32,
       and with it the library would not load on older systems. */
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &previous);
    clock_gettime(CLOCK_BOOTTIME, &before);
    pid = clone3_run(&args, child_main, &job);
    if (pid < 0 && errno == EINVAL) {
        /* A kernel without CLONE_CLEAR_SIGHAND (< 5.5): the child resets the
           handlers itself. (Still EINVAL: clone3 cannot do what is asked.) */
        args.flags &= ~SPAWN_CLONE_CLEAR_SIGHAND;
        job.reset_handlers = 1;
        pid = clone3_run(&args, child_main, &job);
    }
    clone_error = errno;
    clock_gettime(CLOCK_BOOTTIME, &after);
    sigprocmask(SIG_SETMASK, &previous, NULL);

    if (pid < 0) {
        *stage = STAGE_CLONE;
        *error = clone_error;
        return -1;
    }
    if (job.stage != STAGE_NONE) {
        /* The child exited before exec (CLONE_VFORK woke us on its exit). */
        while (waitpid((pid_t)pid, NULL, __WALL) < 0 && errno == EINTR) {
        }
        *stage = job.stage;
        *error = job.error;
        *failed_index = job.failed_index;
        return -1;
    }
    *stage = STAGE_NONE;
    *error = 0;
    /* The kernel stamps a child's start with CLOCK_BOOTTIME inside clone3,
       and /proc shows it in whole clock ticks (USER_HZ, _SC_CLK_TCK): when
       the clock read before and after the call falls in one tick, so does the
       start. Otherwise (a few percent of spawns), or with a tick that is not
       a whole number of nanoseconds, 0: the caller reads /proc. */
    *start_time = 0;
    ticks_per_second = sysconf(_SC_CLK_TCK);
    if (ticks_per_second > 0 && 1000000000L % ticks_per_second == 0) {
        unsigned long long tick_ns = 1000000000ULL / (unsigned long long)ticks_per_second;
        if (boot_ticks(&before, tick_ns) == boot_ticks(&after, tick_ns)) {
            *start_time = boot_ticks(&before, tick_ns);
        }
    }
    return pid;
}
