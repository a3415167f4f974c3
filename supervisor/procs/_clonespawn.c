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
 * Between clone and exec the child makes raw system calls only (no C library
 * function, so it writes no errno of the parent's thread) and touches no
 * memory but the `spawn_job` the parent prepared. Loaded with ctypes by
 * supervisor/clonespawn.py; built by hatch_build.py.
 *
 * The sleep until exec is short on an idle host, but a child the scheduler
 * puts behind another process on a busy one waits for a time slice there,
 * milliseconds, and with CLONE_VFORK the parent waits with it. Given a
 * `spawn_slot` (memory that outlives the call: the job and the child's
 * stack), the child is created without CLONE_VFORK and with
 * CLONE_CHILD_CLEARTID: the kernel zeroes the slot's `tid` word and wakes its
 * futex when the child execs or exits (it releases the shared memory then),
 * and the parent waits on that word for at most `wait_ns`. A child not done
 * by then is left pending: the call returns its pid with STAGE_PENDING, and
 * `adapter_spawn_settle` tells later whether it exec'd. Until then the slot,
 * and everything the job points to, stay the child's.
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
#include <stdlib.h>
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
#define SPAWN_CLONE_CHILD_CLEARTID 0x00200000ULL
#define SPAWN_CLONE_CLEAR_SIGHAND 0x100000000ULL
#define SPAWN_CLONE_INTO_CGROUP 0x200000000ULL
#define SPAWN_SYS_CLONE3 435
#define SPAWN_SYS_CLOSE_RANGE 436
#define SPAWN_FUTEX_WAIT 0
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
    /* Not a failure: a detached child that had not exec'd when the wait ended. */
    STAGE_PENDING = 12,
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

/* Memory lent to a detached child (see the top of the file): its job and its
   stack, from the call that creates it until it has exec'd or exited. The
   caller allocates it with adapter_spawn_slot_new and frees it only once
   adapter_spawn_settle said so (or the call itself settled). */
struct spawn_slot {
    /* 1 while the child may still run in this memory; the kernel's 0 after. */
    _Alignas(8) volatile int tid;
    struct spawn_job job;
    _Alignas(16) unsigned char stack[CHILD_STACK_BYTES];
};

/* A CLOCK_BOOTTIME reading in /proc/<pid>/stat's unit: whole clock ticks. */
static unsigned long long boot_ticks(const struct timespec *time, unsigned long long tick_ns) {
    return (unsigned long long)time->tv_sec * (1000000000ULL / tick_ns) + (unsigned long long)time->tv_nsec / tick_ns;
}

/* A system call made without the C library, for the child: its wrappers
   write errno, which lives in the calling thread's memory, and a detached
   child shares that memory with the thread while both run. Returns the
   kernel's result: -errno on failure. */
static long raw_call(long number, long a1, long a2, long a3, long a4) {
#if defined(__x86_64__) && !defined(__ILP32__)
    long result;
    register long r10 __asm__("r10") = a4;
    /* A fifth argument of 0: prctl refuses anything else where it reads one. */
    register long r8 __asm__("r8") = 0;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "0"(number), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return result;
#else
    (void)number;
    (void)a1;
    (void)a2;
    (void)a3;
    (void)a4;
    return -ENOSYS;
#endif
}

/* The kernel's struct sigaction (x86-64), for rt_sigaction: not the C library's. */
struct kernel_sigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};
#define KERNEL_SIGSET_BYTES 8
#define SPAWN_NSIG 64

static void child_fail(struct spawn_job *job, int stage, long result) {
    job->error = (int)-result;
    job->stage = stage;
    raw_call(SYS_exit_group, 127, 0, 0, 0);
    for (;;) {
    }
}

/* The identity and limits of `identity`. The ids change through the system
   calls themselves: glibc's setuid and friends change every thread of the
   calling process (a signal to each), and this child shares the parent's
   memory, where glibc's list of threads is the parent's. */
static void child_become(struct spawn_job *job, const struct spawn_identity *identity) {
    long result;
    for (int i = 0; i < identity->nlimits; i++) {
        result = raw_call(SYS_prlimit64, 0, identity->limits[i].resource, (long)&identity->limits[i].value, 0);
        if (result < 0) {
            job->failed_index = i;
            child_fail(job, STAGE_RLIMIT, result);
        }
    }
    if (identity->umask >= 0) {
        raw_call(SYS_umask, identity->umask, 0, 0, 0);
    }
    if (identity->no_new_privs && (result = raw_call(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0)) < 0) {
        child_fail(job, STAGE_NO_NEW_PRIVS, result);
    }
    if (!identity->switch_ids) {
        return;
    }
    if ((result = raw_call(SYS_setgroups, identity->ngroups, (long)identity->groups, 0, 0)) < 0) {
        child_fail(job, STAGE_SETGROUPS, result);
    }
    if ((result = raw_call(SYS_setresgid, identity->gid, identity->gid, identity->gid, 0)) < 0) {
        child_fail(job, STAGE_SETGID, result);
    }
    if ((result = raw_call(SYS_setresuid, identity->uid, identity->uid, identity->uid, 0)) < 0) {
        child_fail(job, STAGE_SETUID, result);
    }
}

static int child_main(void *arg) {
    struct spawn_job *job = arg;
    unsigned long none = 0;
    int source[3];
    int error = 0;
    long result;
    struct kernel_sigaction reset = {0};

    /* First of all, while it still shares the parent's fd table: a table of
       its own, with only the fds the parent placed below keep_below. */
    if (job->keep_below > 0
        && (result = raw_call(SPAWN_SYS_CLOSE_RANGE, job->keep_below, ~0U, SPAWN_CLOSE_RANGE_UNSHARE, 0)) < 0) {
        child_fail(job, STAGE_CLOSE_FDS, result);
    }

    /* A caught signal must not run the parent's handler in this child, which
       shares the parent's memory: back to the default action before signals
       are unblocked. CLONE_CLEAR_SIGHAND did that already, unless the kernel
       is too old for it. SIGPIPE and SIGXFSZ, which Python ignores, are
       restored too, as subprocess does. */
    reset.handler = SIG_DFL;
    if (job->reset_handlers) {
        for (int sig = 1; sig <= SPAWN_NSIG; sig++) {
            struct kernel_sigaction action;
            if (sig == SIGKILL || sig == SIGSTOP
                || raw_call(SYS_rt_sigaction, sig, 0, (long)&action, KERNEL_SIGSET_BYTES) < 0) {
                continue;
            }
            if (action.handler != SIG_DFL && action.handler != SIG_IGN) {
                raw_call(SYS_rt_sigaction, sig, (long)&reset, 0, KERNEL_SIGSET_BYTES);
            }
        }
    }
    raw_call(SYS_rt_sigaction, SIGPIPE, (long)&reset, 0, KERNEL_SIGSET_BYTES);
    raw_call(SYS_rt_sigaction, SIGXFSZ, (long)&reset, 0, KERNEL_SIGSET_BYTES);

    if (job->new_session && (result = raw_call(SYS_setsid, 0, 0, 0, 0)) < 0) {
        child_fail(job, STAGE_SESSION, result);
    }

    /* Sources below 3 would be overwritten by the dup2 of another: move them up. */
    for (int i = 0; i < 3; i++) {
        source[i] = job->stdio[i];
        if (source[i] >= 0 && source[i] < 3) {
            result = raw_call(SYS_fcntl, source[i], F_DUPFD_CLOEXEC, 3, 0);
            if (result < 0) {
                child_fail(job, STAGE_STDIO, result);
            }
            source[i] = (int)result;
        }
    }
    for (int i = 0; i < 3; i++) {
        if (source[i] >= 0 && (result = raw_call(SYS_dup2, source[i], i, 0, 0)) < 0) {
            child_fail(job, STAGE_STDIO, result);
        }
    }
    if ((result = raw_call(SPAWN_SYS_CLOSE_RANGE, 3, ~0U, 0, 0)) < 0) {
        child_fail(job, STAGE_CLOSE_FDS, result);
    }
    if (job->cwd != NULL && (result = raw_call(SYS_chdir, (long)job->cwd, 0, 0, 0)) < 0) {
        child_fail(job, STAGE_CWD, result);
    }
    if (job->identity != NULL) {
        child_become(job, job->identity);
    }

    raw_call(SYS_rt_sigprocmask, SIG_SETMASK, (long)&none, 0, KERNEL_SIGSET_BYTES);

    /* Like execvpe: the first failure that is not "no such file here" wins. */
    for (char *const *path = job->paths; *path != NULL; path++) {
        result = raw_call(SYS_execve, (long)*path, (long)job->argv, (long)job->envp, 0);
        if (result != -ENOENT && result != -ENOTDIR && error == 0) {
            error = (int)-result;
        }
    }
    child_fail(job, STAGE_EXEC, error != 0 ? -error : -ENOENT);
    return 127;
}

/* clone3 with a child that runs fn(arg) on its own stack. No C library wraps
   clone3 (glibc 2.36), and a child on a new stack cannot return through the
   parent's frames, so the child's first steps are written out per machine. */
static long clone3_run(struct clone_args_v2 *args, int (*fn)(void *), void *arg) {
#if defined(__x86_64__) && !defined(__ILP32__)
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
    return 4;
}

/* A slot for one detached child (NULL if there is no memory). */
struct spawn_slot *adapter_spawn_slot_new(void) {
    void *memory = NULL;
    if (posix_memalign(&memory, 64, sizeof(struct spawn_slot)) != 0) {
        return NULL;
    }
    return memory;
}

/* Only once the slot's child has settled (or never existed). */
void adapter_spawn_slot_free(struct spawn_slot *slot) {
    free(slot);
}

/* Wait until the slot's child has exec'd or exited, for at most wait_ns
   (0: just look). 1 if it has. */
static int wait_settled(struct spawn_slot *slot, long long wait_ns) {
    struct timespec now, deadline;
    if (__atomic_load_n(&slot->tid, __ATOMIC_ACQUIRE) == 0) {
        return 1;
    }
    if (wait_ns <= 0) {
        return 0;
    }
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += wait_ns / 1000000000LL;
    deadline.tv_nsec += wait_ns % 1000000000LL;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    while (__atomic_load_n(&slot->tid, __ATOMIC_ACQUIRE) != 0) {
        struct timespec left;
        clock_gettime(CLOCK_MONOTONIC, &now);
        left.tv_sec = deadline.tv_sec - now.tv_sec;
        left.tv_nsec = deadline.tv_nsec - now.tv_nsec;
        if (left.tv_nsec < 0) {
            left.tv_sec -= 1;
            left.tv_nsec += 1000000000L;
        }
        if (left.tv_sec < 0) {
            return 0;
        }
        /* Returns at once if the word is 0 already (EAGAIN), on the kernel's
           wake, on a signal or at the timeout: each time, look again. */
        syscall(SYS_futex, &slot->tid, SPAWN_FUTEX_WAIT, 1, &left, NULL, 0);
    }
    return 1;
}

/* The outcome of a settled child: pid, or -1 with *stage and *error set
   (the child is reaped, unless someone else reaped it first). */
static long settled_outcome(long pid, const struct spawn_job *job, int *stage, int *error, int *failed_index) {
    if (job->stage != STAGE_NONE) {
        /* It exited before exec: its status is ours to take. */
        while (waitpid((pid_t)pid, NULL, __WALL) < 0 && errno == EINTR) {
        }
        *stage = job->stage;
        *error = job->error;
        *failed_index = job->failed_index;
        return -1;
    }
    *stage = STAGE_NONE;
    *error = 0;
    return pid;
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
 * slot == NULL: the calling thread sleeps until the child has exec'd or
 * died (CLONE_VFORK). Otherwise the child is detached (see the top of the
 * file) and the call waits for it at most wait_ns: a child still pending then
 * is returned with *stage = STAGE_PENDING, and from then on the slot, paths,
 * argv, envp, cwd, identity and the fds placed below keep_below are the
 * child's until adapter_spawn_settle says it has settled.
 *
 * Returns the child's pid once it has exec'd (or is pending), with its start
 * time in *start_time (0 if it could not be read). On failure returns -1
 * with *stage and *error set; a child that failed before exec has been
 * reaped. STAGE_CLONE means no child ever existed (ENOSYS, EPERM from a
 * seccomp filter, EINVAL from an old kernel: the caller may fall back).
 */
long adapter_spawn(char *const *paths, char *const *argv, char *const *envp, const char *cwd, const int *stdio,
                   int cgroup_fd, int keep_below, int new_session, const struct spawn_identity *identity,
                   struct spawn_slot *slot, long long wait_ns, int *stage, int *error, int *failed_index,
                   unsigned long long *start_time) {
    struct spawn_job on_stack = {
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
    struct spawn_job *job = &on_stack;
    struct clone_args_v2 args = {0};
    _Alignas(16) unsigned char stack[CHILD_STACK_BYTES];
    sigset_t all, previous;
    struct timespec before, after;
    long ticks_per_second;
    long pid;
    int clone_error;

    args.flags = SPAWN_CLONE_VM | SPAWN_CLONE_CLEAR_SIGHAND;
    if (slot == NULL) {
        args.flags |= SPAWN_CLONE_VFORK;
        args.stack = (uint64_t)(uintptr_t)stack;
    } else {
        slot->job = on_stack;
        job = &slot->job;
        slot->tid = 1;
        args.flags |= SPAWN_CLONE_CHILD_CLEARTID;
        args.child_tid = (uint64_t)(uintptr_t)&slot->tid;
        args.stack = (uint64_t)(uintptr_t)slot->stack;
    }
    if (keep_below > 0) {
        args.flags |= SPAWN_CLONE_FILES;
    }
    if (cgroup_fd >= 0) {
        args.flags |= SPAWN_CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cgroup_fd;
    }
    args.exit_signal = SIGCHLD;
    args.stack_size = CHILD_STACK_BYTES;

    /* No handler may run in the child before it has reset them all.
       sigprocmask, not pthread_sigmask: with glibc on Linux both set the
       calling thread's mask alone (and keep glibc's internal signals
       unblocked), but pthread_sigmask is in libc only since glibc 2.32,
       and with it the library would not load on older systems. */
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &previous);
    clock_gettime(CLOCK_BOOTTIME, &before);
    pid = clone3_run(&args, child_main, job);
    if (pid < 0 && errno == EINVAL) {
        /* A kernel without CLONE_CLEAR_SIGHAND (< 5.5): the child resets the
           handlers itself. (Still EINVAL: clone3 cannot do what is asked.) */
        args.flags &= ~SPAWN_CLONE_CLEAR_SIGHAND;
        job->reset_handlers = 1;
        pid = clone3_run(&args, child_main, job);
    }
    clone_error = errno;
    clock_gettime(CLOCK_BOOTTIME, &after);
    sigprocmask(SIG_SETMASK, &previous, NULL);

    if (pid < 0) {
        *stage = STAGE_CLONE;
        *error = clone_error;
        return -1;
    }
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
    if (slot != NULL && !wait_settled(slot, wait_ns)) {
        *stage = STAGE_PENDING;
        *error = 0;
        return pid;
    }
    /* Settled: CLONE_VFORK woke us, or the tid word was cleared. */
    return settled_outcome(pid, job, stage, error, failed_index);
}

/*
 * Whether the pending child `pid` of `slot` has settled, waiting at most
 * wait_ns (0: just look): 0 if not yet; else 1, with *stage STAGE_NONE if it
 * exec'd, or the stage and error it failed with (it has been reaped). Once
 * this returned 1, the slot and what the job pointed to are the caller's
 * again.
 */
int adapter_spawn_settle(struct spawn_slot *slot, long pid, long long wait_ns, int *stage, int *error,
                         int *failed_index) {
    if (!wait_settled(slot, wait_ns)) {
        /* Some kernels leave the word as it was for a child that dumped
           core: one that has exited has settled all the same. */
        siginfo_t info;
        info.si_pid = 0;
        if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid != (pid_t)pid) {
            return 0;
        }
    }
    settled_outcome(pid, &slot->job, stage, error, failed_index);
    return 1;
}
