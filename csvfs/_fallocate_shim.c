/*
 * fallocate support for pyfuse3-based csvfs.
 *
 * pyfuse3 fills a struct fuse_lowlevel_ops without a .fallocate member, so
 * the kernel answers fallocate(2) with EOPNOTSUPP.  This library is loaded
 * with RTLD_GLOBAL before pyfuse3's extension module.  The extension's
 * undefined reference to fuse_session_new is then bound to the definition
 * below (the global scope is searched before the extension's own
 * dependencies), which adds a .fallocate callback and calls the real
 * fuse_session_new from libfuse3.
 *
 * The callback forwards the request to a Python function registered with
 * csvfs_set_fallocate_handler(); Python replies later via
 * csvfs_reply_err(), from a trio task.
 */

/* Same API level pyfuse3 is built with, so both see the same struct layout. */
#define FUSE_USE_VERSION 32
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef void (*csvfs_fallocate_cb)(fuse_req_t req, uint64_t ino, int mode,
                                   int64_t offset, int64_t length,
                                   uint64_t fh);

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static csvfs_fallocate_cb py_handler;
/* Set once our fuse_session_new installed the callback. */
static int interposed;

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

static session_new_fn real_session_new(void)
{
    /* Ask for the exact version pyfuse3 links against, then any version. */
    void *sym = dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");

    if (sym == NULL)
        sym = dlsym(RTLD_NEXT, "fuse_session_new");
    return (session_new_fn)sym;
}

EXPORT struct fuse_session *fuse_session_new(struct fuse_args *args,
                                             const struct fuse_lowlevel_ops *op,
                                             size_t op_size, void *userdata)
{
    /* libfuse copies the ops into the session, so a local copy is enough. */
    struct fuse_lowlevel_ops ops;
    session_new_fn real = real_session_new();

    if (real == NULL) {
        fprintf(stderr, "csvfs fallocate shim: real fuse_session_new not found\n");
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
    return real(args, &ops, sizeof(ops), userdata);
}

EXPORT void csvfs_set_fallocate_handler(csvfs_fallocate_cb cb)
{
    __atomic_store_n(&py_handler, cb, __ATOMIC_RELEASE);
}

EXPORT int csvfs_reply_err(fuse_req_t req, int err)
{
    return fuse_reply_err(req, err);
}

EXPORT int csvfs_fallocate_interposed(void)
{
    return interposed;
}
