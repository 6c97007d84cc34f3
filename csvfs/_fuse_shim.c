/*
 * What csvfs needs from libfuse3 that pyfuse3 does not give it.
 *
 * This library is loaded with RTLD_GLOBAL before pyfuse3's extension module,
 * so the extension's undefined references to the two libfuse3 functions
 * below bind to the definitions here (the global scope is searched before
 * the extension's own dependencies), which then call the real ones.
 *
 * fuse_session_new: pyfuse3 fills a struct fuse_lowlevel_ops without a
 * .fallocate member, so the kernel answers fallocate(2) with EOPNOTSUPP.
 * We add a .fallocate callback that forwards the request to a Python
 * function registered with csvfs_set_handler("fallocate", cb); Python
 * replies later via csvfs_reply_err(), from a trio task.
 *
 * Locks the same way: pyfuse3 has no .getlk, .setlk nor .flock, so the
 * kernel would keep locks per node. If Python registered the "setlk" and
 * "getlk" handlers before the session is made, we add all three (libfuse
 * then asks the kernel for FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS by itself),
 * and replace pyfuse3's .flush with one that passes fi->lock_owner, which
 * pyfuse3 drops (a close releases that owner's POSIX locks). A blocking lock
 * request registers an interrupt callback, so that a signal to the waiting
 * process (FUSE_INTERRUPT) reaches Python ("interrupt" handler). Python
 * replies with csvfs_reply_err() or csvfs_reply_lock().
 *
 * fuse_session_process_buf: libfuse 3.14 predates FUSE_DIRECT_IO_ALLOW_MMAP
 * (Linux 6.6), which lets the kernel map direct_io files MAP_SHARED; without
 * it mmap(MAP_SHARED) fails with ENODEV. Only the INIT request is touched: its
 * reply is caught in a pipe that stands in for /dev/fuse while libfuse answers,
 * the flag is added, and the reply goes to the kernel. Every other request
 * passes straight through.
 *
 * fuse_session_receive_buf: pyfuse3 waits in trio until /dev/fuse is
 * readable, then reads it holding the GIL. A request can leave the queue in
 * between: the kernel withdraws a request that no daemon has read yet when
 * its caller is killed. The read then blocks, with the GIL, until some other
 * request arrives, and the whole node (heartbeats, lease renewal, RPC)
 * freezes with it. So the device is made non-blocking, and "nothing to
 * read" is reported as EINTR, which pyfuse3 answers by waiting again.
 * It is also where the data path's fast lane (_fast_path.c) answers the
 * reads and writes that need nothing from Python, before libfuse sees them.
 */

/* Same API level pyfuse3 is built with, so both see the same struct layout. */
#define FUSE_USE_VERSION 32
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>

#include "_fast_path.h"

#define EXPORT __attribute__((visibility("default")))

typedef void (*csvfs_fallocate_cb)(fuse_req_t req, uint64_t ino, int mode,
                                   int64_t offset, int64_t length,
                                   uint64_t fh);

/* kind: 0 a POSIX or OFD lock, 1 flock; type: F_RDLCK, F_WRLCK or F_UNLCK;
 * [start, end] inclusive, end INT64_MAX meaning to the end of the file. */
typedef void (*csvfs_setlk_cb)(fuse_req_t req, uint64_t ino, uint64_t fh,
                               uint64_t owner, int kind, int type,
                               int64_t start, int64_t end, uint32_t pid,
                               int sleep);
typedef void (*csvfs_getlk_cb)(fuse_req_t req, uint64_t ino, uint64_t fh,
                               uint64_t owner, int type, int64_t start,
                               int64_t end, uint32_t pid);
typedef void (*csvfs_flush_cb)(fuse_req_t req, uint64_t ino, uint64_t fh,
                               uint64_t owner);
typedef void (*csvfs_interrupt_cb)(fuse_req_t req);
typedef void (*flush_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static csvfs_fallocate_cb py_handler;
static csvfs_setlk_cb py_setlk;
static csvfs_getlk_cb py_getlk;
static csvfs_flush_cb py_flush;
static csvfs_interrupt_cb py_interrupt;
/* pyfuse3's own flush, for when no Python flush handler is set. */
static flush_fn pyfuse3_flush;
/* Set once our fuse_session_new installed the callback. */
static int interposed;
static int locks_interposed;

#define LOAD(handler) __atomic_load_n(&(handler), __ATOMIC_ACQUIRE)
#define LOCK_OFFSET_MAX INT64_MAX

static int64_t lock_end(const struct flock *lock)
{
    return lock->l_len == 0 ? LOCK_OFFSET_MAX : lock->l_start + lock->l_len - 1;
}

static void shim_interrupted(fuse_req_t req, void *data)
{
    csvfs_interrupt_cb cb = LOAD(py_interrupt);

    (void)data;
    if (cb != NULL)
        cb(req);
}

static void lock_request(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi, int kind, int type,
                         int64_t start, int64_t end, uint32_t pid, int sleep)
{
    csvfs_setlk_cb cb = LOAD(py_setlk);

    if (cb == NULL) {
        fuse_reply_err(req, ENOLCK);
        return;
    }
    /* Before Python sees the request (it may answer it at once, and then the
     * request is gone). libfuse calls shim_interrupted right here if the
     * interrupt came already. */
    if (sleep)
        fuse_req_interrupt_func(req, shim_interrupted, NULL);
    cb(req, ino, fi->fh, fi->lock_owner, kind, type, start, end, pid, sleep);
}

static void shim_setlk(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi, struct flock *lock, int sleep)
{
    lock_request(req, ino, fi, 0, lock->l_type, lock->l_start, lock_end(lock),
                 lock->l_pid, sleep);
}

static void shim_flock(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi, int op)
{
    int type = F_UNLCK;

    if (op & LOCK_SH)
        type = F_RDLCK;
    else if (op & LOCK_EX)
        type = F_WRLCK;
    lock_request(req, ino, fi, 1, type, 0, LOCK_OFFSET_MAX, 0, !(op & LOCK_NB));
}

static void shim_getlk(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi, struct flock *lock)
{
    csvfs_getlk_cb cb = LOAD(py_getlk);

    if (cb == NULL) {
        fuse_reply_err(req, ENOLCK);
        return;
    }
    cb(req, ino, fi->fh, fi->lock_owner, lock->l_type, lock->l_start,
       lock_end(lock), lock->l_pid);
}

static void shim_flush(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi)
{
    csvfs_flush_cb cb = LOAD(py_flush);

    if (cb == NULL) {
        pyfuse3_flush(req, ino, fi);
        return;
    }
    cb(req, ino, fi->fh, fi->lock_owner);
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
                           off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    csvfs_fallocate_cb cb = __atomic_load_n(&py_handler, __ATOMIC_ACQUIRE);

    if (cb == NULL) {
        /* EOPNOTSUPP, not ENOSYS: ENOSYS would make the kernel disable
         * fallocate for the whole mount, even after a handler is set. */
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    cb(req, ino, mode, offset, length, fi ? fi->fh : 0);
}

/* The session whose device was made non-blocking. */
static struct fuse_session *nonblocking_session;

static void *real_symbol(const char *name)
{
    /* Ask for the exact version pyfuse3 links against, then any version. */
    void *sym = dlvsym(RTLD_NEXT, name, "FUSE_3.0");

    return sym != NULL ? sym : dlsym(RTLD_NEXT, name);
}

EXPORT struct fuse_session *fuse_session_new(struct fuse_args *args,
                                             const struct fuse_lowlevel_ops *op,
                                             size_t op_size, void *userdata)
{
    /* libfuse copies the ops into the session, so a local copy is enough. */
    struct fuse_lowlevel_ops ops;
    session_new_fn real = (session_new_fn)real_symbol("fuse_session_new");

    if (real == NULL) {
        fprintf(stderr, "csvfs fuse shim: real fuse_session_new not found\n");
        return NULL;
    }
    /* The caller may have been built against an older, smaller struct. */
    memset(&ops, 0, sizeof(ops));
    memcpy(&ops, op, op_size < sizeof(ops) ? op_size : sizeof(ops));
    /* libfuse3's own high-level fuse_new() also lands here (its internal
     * call is interposed too) and has a fallocate of its own: keep it. */
    if (ops.fallocate == NULL) {
        ops.fallocate = shim_fallocate;
        interposed = 1;
    }
    /* Locks only for a caller that will answer them (csvfs, not every user
     * of the shim), and only where it has none of its own. */
    if (ops.getlk == NULL && ops.setlk == NULL && ops.flock == NULL &&
        ops.flush != NULL && LOAD(py_setlk) != NULL && LOAD(py_getlk) != NULL &&
        LOAD(py_flush) != NULL) {
        ops.getlk = shim_getlk;
        ops.setlk = shim_setlk;
        ops.flock = shim_flock;
        pyfuse3_flush = ops.flush;
        ops.flush = shim_flush;
        locks_interposed = 1;
    }
    return real(args, &ops, sizeof(ops), userdata);
}

static int make_nonblocking(struct fuse_session *se)
{
    int fd = fuse_session_fd(se);
    int flags = fcntl(fd, F_GETFL);

    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -errno;
    __atomic_store_n(&nonblocking_session, se, __ATOMIC_RELEASE);
    return 0;
}

EXPORT int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    static receive_buf_fn real;
    int res;

    if (real == NULL)
        real = (receive_buf_fn)real_symbol("fuse_session_receive_buf");
    if (real == NULL)
        return -ENOSYS;
    if (__atomic_load_n(&nonblocking_session, __ATOMIC_ACQUIRE) != se) {
        res = make_nonblocking(se);
        if (res < 0)
            return res;
    }
    /* The fast lane takes the plain reads and writes here (_fast_path.c). */
    res = csvfs_fast_receive(se, buf, real);
    return res == -EAGAIN ? -EINTR : res;
}

/* The kernel's protocol numbers (linux/fuse.h); libfuse 3.14 lacks the last. */
#define OPCODE_INIT 26
#define INIT_EXT (1u << 30)                  /* flags2 is valid */
#define FLAGS2_DIRECT_IO_ALLOW_MMAP (1u << 4) /* bit 36 of the 64-bit flags */
/* Offsets in an INIT reply: fuse_out_header (16 bytes), then fuse_init_out. */
#define REPLY_ERROR_AT 4
#define REPLY_FLAGS_AT (16 + 12)
#define REPLY_FLAGS2_AT (16 + 32)

static int mmap_allowed; /* the kernel accepted the flag in our INIT reply */

static int is_init_request(const struct fuse_buf *buf)
{
    uint32_t opcode;

    if (buf->flags & FUSE_BUF_IS_FD || buf->size < 8)
        return 0;
    memcpy(&opcode, (const char *)buf->mem + 4, sizeof(opcode));
    return opcode == OPCODE_INIT;
}

/* Add FUSE_DIRECT_IO_ALLOW_MMAP to a successful INIT reply, if the kernel
 * speaks the extended INIT at all; 1 if it was added. */
static int allow_mmap_in_reply(char *reply, ssize_t length)
{
    int32_t error;
    uint32_t flags, flags2;

    if (length < REPLY_FLAGS2_AT + 4)
        return 0;
    memcpy(&error, reply + REPLY_ERROR_AT, 4);
    memcpy(&flags, reply + REPLY_FLAGS_AT, 4);
    if (error != 0 || !(flags & INIT_EXT))
        return 0;
    memcpy(&flags2, reply + REPLY_FLAGS2_AT, 4);
    flags2 |= FLAGS2_DIRECT_IO_ALLOW_MMAP;
    memcpy(reply + REPLY_FLAGS2_AT, &flags2, 4);
    return 1;
}

/* Let libfuse answer INIT into a pipe standing in for /dev/fuse, then send
 * the amended reply. -1 if the stand-in could not be set up (nothing done). */
static int process_init(struct fuse_session *se, const struct fuse_buf *buf,
                        process_buf_fn real)
{
    char reply[4096];
    int fd = fuse_session_fd(se);
    int pipe_fds[2], saved;
    ssize_t length;

    if (pipe2(pipe_fds, O_CLOEXEC) < 0)
        return -1;
    saved = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (saved < 0 || dup3(pipe_fds[1], fd, 0) < 0) {
        if (saved >= 0)
            close(saved);
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        return -1;
    }
    real(se, buf);
    if (dup3(saved, fd, 0) < 0) {
        /* The session lost its device: nothing sensible can follow. */
        fprintf(stderr, "csvfs fuse shim: cannot restore /dev/fuse: %s\n",
                strerror(errno));
        abort();
    }
    close(saved);
    close(pipe_fds[1]);
    length = read(pipe_fds[0], reply, sizeof(reply));
    close(pipe_fds[0]);
    if (length <= 0)
        return 0;
    mmap_allowed = allow_mmap_in_reply(reply, length);
    if (write(fd, reply, length) != length)
        fprintf(stderr, "csvfs fuse shim: INIT reply: %s\n", strerror(errno));
    return 0;
}

EXPORT void fuse_session_process_buf(struct fuse_session *se,
                                     const struct fuse_buf *buf)
{
    static process_buf_fn real;

    if (real == NULL)
        real = (process_buf_fn)real_symbol("fuse_session_process_buf");
    if (real == NULL)
        return;
    if (is_init_request(buf) && process_init(se, buf, real) == 0)
        return;
    real(se, buf);
}

EXPORT int csvfs_mmap_allowed(void)
{
    return mmap_allowed;
}

EXPORT void csvfs_set_fallocate_handler(csvfs_fallocate_cb cb)
{
    __atomic_store_n(&py_handler, cb, __ATOMIC_RELEASE);
}

/* Register the Python callback for one operation; -1 for an unknown name.
 * The lock handlers must be set before the session is made. */
EXPORT int csvfs_set_handler(const char *op, void *cb)
{
    if (strcmp(op, "fallocate") == 0)
        __atomic_store_n(&py_handler, (csvfs_fallocate_cb)cb, __ATOMIC_RELEASE);
    else if (strcmp(op, "setlk") == 0)
        __atomic_store_n(&py_setlk, (csvfs_setlk_cb)cb, __ATOMIC_RELEASE);
    else if (strcmp(op, "getlk") == 0)
        __atomic_store_n(&py_getlk, (csvfs_getlk_cb)cb, __ATOMIC_RELEASE);
    else if (strcmp(op, "flush") == 0)
        __atomic_store_n(&py_flush, (csvfs_flush_cb)cb, __ATOMIC_RELEASE);
    else if (strcmp(op, "interrupt") == 0)
        __atomic_store_n(&py_interrupt, (csvfs_interrupt_cb)cb, __ATOMIC_RELEASE);
    else
        return -1;
    return 0;
}

/* F_GETLK's answer: type F_UNLCK for no conflict, else the conflicting lock. */
EXPORT int csvfs_reply_lock(fuse_req_t req, int type, int64_t start,
                            int64_t end, uint32_t pid)
{
    struct flock lock;

    memset(&lock, 0, sizeof(lock));
    lock.l_type = type;
    lock.l_whence = SEEK_SET;
    if (type != F_UNLCK) {
        lock.l_start = start;
        lock.l_len = end == LOCK_OFFSET_MAX ? 0 : end - start + 1;
        lock.l_pid = pid;
    }
    return fuse_reply_lock(req, &lock);
}

EXPORT int csvfs_locks_interposed(void)
{
    return locks_interposed;
}

EXPORT int csvfs_reply_err(fuse_req_t req, int err)
{
    return fuse_reply_err(req, err);
}

EXPORT int csvfs_fallocate_interposed(void)
{
    return interposed;
}
