/*
 * The data path's fast lane: reads and writes that need nothing from Python.
 *
 * A node's data path (csvfs/datapath.py) answers most reads and writes with
 * one pread or pwrite at the mapped offset. Through pyfuse3 each of them
 * still costs a trio task, a coroutine and a Python bytes object, about
 * 40 us, so at queue depth the node, not the image, sets the pace. Here the
 * shim answers those requests itself, in C, straight from the buffer that
 * fuse_session_receive_buf filled (_fuse_shim.c calls csvfs_fast_serve on
 * every request before libfuse sees it).
 *
 * The tables are a mirror that Python keeps exact (csvfs/fuse_shim.py
 * FastPath, driven by csvfs/datapath.py):
 *
 *   - a file is here only while its gate is open, with its size, its map
 *     (runs of file granule -> volume granule), the granules whose first
 *     write must ask the coordinator (a snapshot holds them, or change
 *     tracking has not marked them yet: their writes are Python's), and
 *     whether its writes
 *     note the 64 KiB stripes they touch (change tracking: the lane keeps
 *     those notes per granule until Python takes them, csvfs_fast_take_stripes);
 *   - a handle is here with whether its writes may come here (not O_APPEND,
 *     no set-id bits to clear first);
 *   - the deadline is the data path's valid_until (CLOCK_MONOTONIC), zero
 *     while a snapshot hold is on, the node is fenced or its I/O redirected.
 *
 * Anything else (a file or handle not here, a hole to write, a write past
 * the size, an unaligned O_DIRECT request, no free slot) goes to Python
 * unchanged, which then does exactly what it did before: the lane is only
 * ever a shortcut.
 *
 * Requests in flight at once: the trio thread takes requests from /dev/fuse
 * (csvfs_fast_receive, inside pyfuse3's call of fuse_session_receive_buf),
 * plans each against the tables (which pieces of the image it touches) and
 * queues it for a worker thread, which does the pread or pwrite and answers
 * the kernel itself. The trio thread goes on taking requests while there are
 * any, up to FAST_BATCH, and waits for its workers before it returns to
 * Python, with a request for libfuse or with nothing.
 *
 * Why the gate stays exact: Python runs only when no job of the lane is in
 * flight, and it changes the tables on the trio thread, where the lane plans.
 * When Python closes a gate (a pause, a hold, a fence) it removes the file or
 * zeroes the deadline in the same step, so no request planned afterwards
 * passes, and none planned before is still running.
 *
 * A request alone (nothing else came with it, nothing is in flight) is done
 * on the trio thread at once: at queue depth 1 the hand-off to a worker
 * would cost more than it saves. With no workers, every request is.
 *
 * An fdatasync of a file in the lane that has nothing at the coordinator to
 * make durable (no append or redirected write since its last fsync: every
 * metadata change of the node was durable when it returned) is the image's
 * fdatasync, and dropping what pages a shared map left in the kernel. A
 * thread of its own, the syncer, does both and answers; one fdatasync covers
 * every request queued when it starts. These jobs touch no table, so they do
 * not count as in flight: the trio thread and Python go on meanwhile, as
 * they did while pyfuse3's handler waited for its worker thread.
 *
 * A pread, pwrite or fdatasync that fails is returned to Python
 * (csvfs_fast_take_returned; fuse_shim.FastLane.serve_returned), which does
 * the request again through its own handlers, sees the failure itself and
 * sends the node to redirected I/O.
 */

#define FUSE_USE_VERSION 32
#define _GNU_SOURCE

#include <errno.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_fast_path.h"

/* Requests the lane takes in one call, before trio runs again. */
#define FAST_BATCH 64

#define EXPORT __attribute__((visibility("default")))

/* The kernel's protocol (linux/fuse.h), under names of our own. */
#define OP_READ 15
#define OP_WRITE 16
#define OP_FSYNC 20
#define FSYNC_DATASYNC 1

struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

struct io_in { /* fuse_read_in and fuse_write_in have one layout */
    uint64_t fh, offset;
    uint32_t size, io_flags;
    uint64_t lock_owner;
    uint32_t flags, padding;
};

struct fsync_in {
    uint64_t fh;
    uint32_t fsync_flags, padding;
};

struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct write_out {
    uint32_t size, padding;
};

#define LANE_MAX (1u << 20) /* the largest request served here */
#define STRIPE (64 << 10)   /* change tracking's grain (csvfs/volume/extents.py) */
#define BUCKETS 4096

struct run {
    int64_t file_first, volume_first, count;
};

struct ask_run {
    int64_t first, count;
};

struct file {
    uint64_t ino;
    int64_t size, granule;
    int sync_here; /* an fdatasync needs nothing of the coordinator */
    int note_stripes;
    uint64_t *stripes; /* per file granule: a mask of the stripes written */
    size_t nstripes;
    int64_t dirty_mtime_ns; /* the time of the last write served here */
    size_t nruns;
    struct run *runs; /* sorted by file_first */
    size_t nasks;
    struct ask_run *asks; /* sorted by first */
    struct file *next;
};

struct handle {
    uint64_t fh, ino;
    int writes;
    struct handle *next;
};

static struct file *files[BUCKETS];
static struct handle *handles[BUCKETS];

static int image_fd = -1;
static int64_t data_base;
static int64_t sector; /* 0: the page cache; else O_DIRECT's alignment */
static int64_t deadline_ns;
/* Reads and writes answered; requests handed to Python, and of those, how
 * many after a failed pread, pwrite or fdatasync; fdatasyncs answered. */
static uint64_t counts[5];
static int injected_fault; /* `csvfs fault ... storage-down`: every call fails */

static size_t bucket(uint64_t key)
{
    return (size_t)(key * 0x9E3779B97F4A7C15ull >> 52) % BUCKETS;
}

static struct file *find_file(uint64_t ino)
{
    struct file *file = files[bucket(ino)];

    while (file != NULL && file->ino != ino)
        file = file->next;
    return file;
}

static struct handle *find_handle(uint64_t fh)
{
    struct handle *handle = handles[bucket(fh)];

    while (handle != NULL && handle->fh != fh)
        handle = handle->next;
    return handle;
}

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;

    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The image offset of file byte `offset`, -1 in a hole. */
static int64_t image_offset(const struct file *file, int64_t offset)
{
    int64_t granule = offset / file->granule;
    size_t low = 0, high = file->nruns;

    while (low < high) {
        size_t middle = (low + high) / 2;
        const struct run *run = &file->runs[middle];

        if (granule < run->file_first)
            high = middle;
        else if (granule >= run->file_first + run->count)
            low = middle + 1;
        else
            return data_base + (run->volume_first + granule - run->file_first) * file->granule
                   + offset % file->granule;
    }
    return -1;
}

static int aligned(int64_t position, int64_t length)
{
    return sector == 0 || (position % sector == 0 && length % sector == 0);
}

/* Each piece of [offset, end) inside one granule, in turn: `act` returns 0
 * to stop the walk, which then returns 0. */
typedef int (*piece_fn)(const struct file *, int64_t position, char *at, int64_t length);

static int walk(const struct file *file, int64_t offset, int64_t end, char *data, piece_fn act)
{
    while (offset < end) {
        int64_t piece_end = (offset / file->granule + 1) * file->granule;

        if (piece_end > end)
            piece_end = end;
        if (!act(file, image_offset(file, offset), data, piece_end - offset))
            return 0;
        data += piece_end - offset;
        offset = piece_end;
    }
    return 1;
}

static int read_piece(const struct file *file, int64_t position, char *at, int64_t length)
{
    ssize_t done;

    (void)file;
    if (__atomic_load_n(&injected_fault, __ATOMIC_RELAXED))
        return 0;
    if (position < 0) { /* a hole reads as zeros */
        memset(at, 0, length);
        return 1;
    }
    if (!aligned(position, length))
        return 0;
    done = pread(image_fd, at, length, position);
    if (done < 0)
        return 0;
    memset(at + done, 0, length - done); /* only past the end of a short image */
    return 1;
}

static int write_piece(const struct file *file, int64_t position, char *at, int64_t length)
{
    (void)file;
    if (__atomic_load_n(&injected_fault, __ATOMIC_RELAXED))
        return 0;
    return pwrite(image_fd, at, length, position) == length;
}

static void reply(int fd, uint64_t unique, int error, const void *data, size_t length)
{
    struct out_header out = {sizeof(out) + length, -error, unique};
    struct iovec parts[2] = {{&out, sizeof(out)}, {(void *)data, length}};

    /* A failed reply (ENOENT: the request was interrupted meanwhile) is the
     * kernel's business, as it is when libfuse sends one. */
    (void)!writev(fd, parts, length ? 2 : 1);
}

static void count(int which)
{
    __atomic_add_fetch(&counts[which], 1, __ATOMIC_RELAXED);
}

/* -- requests in flight: jobs for the worker threads ---------------------- */

#define SLOTS 32
#define MAX_PIECES (LANE_MAX / 4096 + 1)

struct piece {
    int64_t position, length; /* position -1: a hole, read as zeros */
};

struct job {
    uint64_t unique, fh, ino;
    int64_t offset;
    uint32_t opcode, size; /* size: asked for; length: a read's, clipped at EOF */
    int64_t length;
    struct file *file;
    int npieces;
    struct piece pieces[MAX_PIECES];
    char *buffer; /* LANE_MAX, page-aligned, allocated at first use */
};

static struct job jobs[SLOTS];
static int free_slots[SLOTS], nfree;
static int queued[SLOTS], queue_head, queue_length;
static int returned[SLOTS], nreturned; /* failed jobs, for Python to do again */
static int in_flight;
static int fuse_fd = -1;
static int done_fd = -1;     /* eventfd: a job finished (the trio thread may wait on it) */
static int returned_fd = -1; /* eventfd: a job was returned (a Python task waits on it) */
static int nworkers, stopping;
static pthread_t workers[16];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_ready = PTHREAD_COND_INITIALIZER;
static pthread_cond_t all_done = PTHREAD_COND_INITIALIZER;

static void signal_fd(int fd)
{
    uint64_t one = 1;

    (void)!write(fd, &one, sizeof(one));
}

static struct job *planned; /* the job plan() fills, on the trio thread */

static int add_piece(const struct file *file, int64_t position, char *at, int64_t length)
{
    struct job *job = planned;

    (void)file, (void)at;
    if (position >= 0 && !aligned(position, length))
        return 0;
    job->pieces[job->npieces].position = position;
    job->pieces[job->npieces].length = length;
    job->npieces++;
    return 1;
}

/* The stripes of one granule that [start, end) touches (inside that granule). */
static uint64_t stripe_mask(const struct file *file, int64_t start, int64_t end)
{
    int64_t first = start % file->granule / STRIPE, last = (end - 1) % file->granule / STRIPE;

    return (last >= 63 ? ~0ull : (1ull << (last + 1)) - 1) & ~((1ull << first) - 1);
}

/* Note the stripes a write to [offset, end) touches, before it is done: if it
 * then fails, Python does it again and notes it too (a stripe noted but not
 * changed only costs a backup a read). 0 if there is no memory to note it. */
static int note_stripes(struct file *file, int64_t offset, int64_t end)
{
    size_t last = (size_t)((end - 1) / file->granule);

    if (last >= file->nstripes) {
        size_t grown = last + 1 > 2 * file->nstripes ? last + 1 : 2 * file->nstripes;
        uint64_t *stripes = realloc(file->stripes, grown * sizeof(*stripes));

        if (stripes == NULL)
            return 0;
        memset(stripes + file->nstripes, 0, (grown - file->nstripes) * sizeof(*stripes));
        file->stripes = stripes;
        file->nstripes = grown;
    }
    while (offset < end) {
        int64_t piece_end = (offset / file->granule + 1) * file->granule;

        if (piece_end > end)
            piece_end = end;
        file->stripes[offset / file->granule] |= stripe_mask(file, offset, piece_end);
        offset = piece_end;
    }
    return 1;
}

/* Does a granule in [first, last] ask the coordinator first? */
static int asks_first(const struct file *file, int64_t first, int64_t last)
{
    size_t low = 0, high = file->nasks;

    while (low < high) { /* the first run that ends past `first` */
        size_t middle = (low + high) / 2;

        if (file->asks[middle].first + file->asks[middle].count <= first)
            low = middle + 1;
        else
            high = middle;
    }
    return low < file->nasks && file->asks[low].first <= last;
}

/* Which pieces the job has, or 0 if the lane cannot do it whole. */
static int plan(struct job *job, const struct io_in *arg, struct file *file)
{
    int64_t end = (int64_t)arg->offset + arg->size;

    job->npieces = 0;
    if (job->opcode == OP_READ) {
        end = end > file->size ? file->size : end;
        end = end < (int64_t)arg->offset ? (int64_t)arg->offset : end;
    } else if (end > file->size ||
               asks_first(file, arg->offset / file->granule, (end - 1) / file->granule)) {
        return 0;
    }
    job->length = end - (int64_t)arg->offset;
    /* O_DIRECT: whole sectors only, so that every piece (granules are whole
     * sectors) lands at an aligned place of the buffer too. */
    if (sector != 0 && ((int64_t)arg->offset % sector != 0 || job->length % sector != 0))
        return 0;
    planned = job;
    if (!walk(file, arg->offset, end, job->buffer, add_piece))
        return 0;
    if (job->opcode == OP_WRITE) {
        for (int i = 0; i < job->npieces; i++)
            if (job->pieces[i].position < 0)
                return 0;
        if (file->note_stripes && !note_stripes(file, arg->offset, end))
            return 0;
    }
    return 1;
}

static int do_job(struct job *job)
{
    char *at = job->buffer;

    for (int i = 0; i < job->npieces; i++) {
        struct piece *piece = &job->pieces[i];
        int ok = job->opcode == OP_READ
                     ? read_piece(job->file, piece->position, at, piece->length)
                     : write_piece(job->file, piece->position, at, piece->length);

        if (!ok)
            return 0;
        at += piece->length;
    }
    if (job->opcode == OP_READ) {
        reply(fuse_fd, job->unique, 0, job->buffer, job->length);
    } else {
        struct write_out out = {job->size, 0};

        __atomic_store_n(&job->file->dirty_mtime_ns, now_ns(CLOCK_REALTIME), __ATOMIC_RELAXED);
        reply(fuse_fd, job->unique, 0, &out, sizeof(out));
    }
    count(job->opcode == OP_READ ? 0 : 1);
    return 1;
}

/* A job whose call failed goes back to Python (with the lock held). */
static void hand_back_locked(int slot)
{
    returned[nreturned++] = slot;
    count(2);
    count(3);
}

static void finish(struct job *job, int done)
{
    int slot = job - jobs;

    pthread_mutex_lock(&lock);
    if (done)
        free_slots[nfree++] = slot;
    else
        hand_back_locked(slot);
    if (--in_flight == 0)
        pthread_cond_broadcast(&all_done);
    pthread_mutex_unlock(&lock);
    signal_fd(done_fd); /* the trio thread may be waiting for the last one */
    if (!done)
        signal_fd(returned_fd);
}

static void *work(void *unused)
{
    (void)unused;
    for (;;) {
        struct job *job;

        pthread_mutex_lock(&lock);
        while (queue_length == 0 && !stopping)
            pthread_cond_wait(&work_ready, &lock);
        if (queue_length == 0) {
            pthread_mutex_unlock(&lock);
            return NULL;
        }
        job = &jobs[queued[queue_head]];
        queue_head = (queue_head + 1) % SLOTS;
        queue_length--;
        pthread_mutex_unlock(&lock);
        finish(job, do_job(job));
    }
}

static struct job *take_slot(void)
{
    struct job *job = NULL;

    pthread_mutex_lock(&lock);
    if (nfree > 0)
        job = &jobs[free_slots[--nfree]];
    pthread_mutex_unlock(&lock);
    if (job != NULL && job->buffer == NULL &&
        posix_memalign((void **)&job->buffer, 4096, LANE_MAX) != 0)
        job->buffer = NULL;
    if (job != NULL && job->buffer == NULL) {
        pthread_mutex_lock(&lock);
        free_slots[nfree++] = job - jobs;
        pthread_mutex_unlock(&lock);
        return NULL;
    }
    return job;
}

static void put_back(struct job *job)
{
    pthread_mutex_lock(&lock);
    free_slots[nfree++] = job - jobs;
    pthread_mutex_unlock(&lock);
}

static void submit(struct job *job)
{
    pthread_mutex_lock(&lock);
    in_flight++;
    queued[(queue_head + queue_length) % SLOTS] = job - jobs;
    queue_length++;
    pthread_cond_signal(&work_ready);
    pthread_mutex_unlock(&lock);
}

/* Take one request into the lane: its job, planned and ready to run, or
 * NULL to hand it to libfuse. */
static struct job *take(int fd, const void *request, size_t length)
{
    const struct in_header *in = request;
    const struct io_in *arg = (const struct io_in *)(in + 1);
    struct handle *handle;
    struct file *file;
    struct job *job;

    if (image_fd < 0 || length < sizeof(*in) + sizeof(*arg))
        return NULL;
    if (in->opcode != OP_READ && in->opcode != OP_WRITE)
        return NULL;
    if (arg->size > LANE_MAX || now_ns(CLOCK_MONOTONIC) >= deadline_ns)
        goto handed_over;
    handle = find_handle(arg->fh);
    file = handle != NULL ? find_file(handle->ino) : NULL;
    if (file == NULL || (in->opcode == OP_WRITE && !handle->writes))
        goto handed_over;
    if (in->opcode == OP_WRITE && in->len < sizeof(*in) + sizeof(*arg) + arg->size)
        goto handed_over;
    job = take_slot();
    if (job == NULL)
        goto handed_over;
    job->opcode = in->opcode;
    if (!plan(job, arg, file)) {
        put_back(job);
        goto handed_over;
    }
    job->unique = in->unique;
    job->fh = arg->fh;
    job->offset = arg->offset;
    job->size = arg->size;
    job->file = file;
    if (in->opcode == OP_WRITE)
        memcpy(job->buffer, arg + 1, arg->size);
    fuse_fd = fd;
    return job;
handed_over:
    count(2);
    return NULL;
}

static int jobs_in_flight(void);

/* A worker does the job, or, with none, or when it is the only request there
 * is (`alone`: a thread's hand-off would cost more than it saves), the trio
 * thread does it now. */
static void start(struct job *job, int alone)
{
    if (nworkers > 0 && !(alone && jobs_in_flight() == 0)) {
        submit(job);
        return;
    }
    pthread_mutex_lock(&lock);
    in_flight++;
    pthread_mutex_unlock(&lock);
    finish(job, do_job(job));
}

/* Until no job is in flight. */
static void drain(void)
{
    pthread_mutex_lock(&lock);
    while (in_flight > 0)
        pthread_cond_wait(&all_done, &lock);
    pthread_mutex_unlock(&lock);
}

static int jobs_in_flight(void)
{
    int n;

    pthread_mutex_lock(&lock);
    n = in_flight;
    pthread_mutex_unlock(&lock);
    return n;
}

/* Until /dev/fuse has a request or a job finished. */
static void wait_for_more(int fd)
{
    struct pollfd fds[2] = {{fd, POLLIN, 0}, {done_fd, POLLIN, 0}};
    uint64_t counter;

    if (poll(fds, 2, -1) > 0 && fds[1].revents & POLLIN)
        (void)!read(done_fd, &counter, sizeof(counter));
}

/* -- fdatasyncs, on the syncer thread ------------------------------------ */

static pthread_t syncer;
static int syncer_running, sync_fd = -1;
static int sync_queue[SLOTS], sync_length;
static pthread_cond_t sync_ready = PTHREAD_COND_INITIALIZER;
static struct fuse_session *session;

/* Answer the fdatasyncs of one batch, or return them to Python. */
static void finish_syncs(const int *batch, int n, int ok)
{
    for (int i = 0; i < n; i++) {
        struct job *job = &jobs[batch[i]];

        if (!ok) {
            pthread_mutex_lock(&lock);
            hand_back_locked(batch[i]);
            pthread_mutex_unlock(&lock);
            signal_fd(returned_fd);
            continue;
        }
        /* -ENOENT: the kernel has nothing cached of it */
        (void)fuse_lowlevel_notify_inval_inode(session, job->ino, 0, 0);
        reply(fuse_fd, job->unique, 0, NULL, 0);
        count(4);
        put_back(job);
    }
}

static void *sync_work(void *unused)
{
    int batch[SLOTS], n;

    (void)unused;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (sync_length == 0 && !stopping)
            pthread_cond_wait(&sync_ready, &lock);
        n = sync_length;
        memcpy(batch, sync_queue, n * sizeof(*batch));
        sync_length = 0;
        pthread_mutex_unlock(&lock);
        if (n == 0)
            return NULL;
        finish_syncs(batch, n, !__atomic_load_n(&injected_fault, __ATOMIC_RELAXED) &&
                                   fdatasync(sync_fd) == 0);
    }
}

/* An fdatasync the syncer can do: queued there (1), or left for libfuse (0). */
static int take_sync(struct fuse_session *se, int fd, const void *request, size_t length)
{
    const struct in_header *in = request;
    const struct fsync_in *arg = (const struct fsync_in *)(in + 1);
    struct handle *handle;
    struct file *file;
    struct job *job;

    if (!syncer_running || length < sizeof(*in) + sizeof(*arg) || in->opcode != OP_FSYNC ||
        !(arg->fsync_flags & FSYNC_DATASYNC) || now_ns(CLOCK_MONOTONIC) >= deadline_ns)
        return 0;
    handle = find_handle(arg->fh);
    file = handle != NULL ? find_file(handle->ino) : NULL;
    if (file == NULL || !file->sync_here || (job = take_slot()) == NULL)
        return 0;
    job->opcode = OP_FSYNC;
    job->unique = in->unique;
    job->fh = arg->fh;
    job->ino = file->ino;
    job->offset = job->size = 0;
    session = se;
    fuse_fd = fd;
    pthread_mutex_lock(&lock);
    sync_queue[sync_length++] = job - jobs;
    pthread_cond_signal(&sync_ready);
    pthread_mutex_unlock(&lock);
    return 1;
}

/* Each job starts once the next request is read: then it is known whether
 * another came with it (a worker takes it) or it is alone. */
int csvfs_fast_receive(struct fuse_session *se, struct fuse_buf *buf, receive_fn receive)
{
    int fd = fuse_session_fd(se);
    int taken = 0, res = -EAGAIN;
    struct job *held = NULL, *job;

    for (;;) {
        if (taken < FAST_BATCH) {
            res = receive(se, buf);
            if (res > 0 && !(buf->flags & FUSE_BUF_IS_FD) && take_sync(se, fd, buf->mem, res)) {
                taken++;
                continue;
            }
            job = res > 0 && !(buf->flags & FUSE_BUF_IS_FD) ? take(fd, buf->mem, res) : NULL;
            if (held != NULL)
                start(held, job == NULL && res == -EAGAIN);
            held = job;
            if (job != NULL) {
                taken++;
                continue;
            }
            if (res != -EAGAIN) {
                drain(); /* Python never runs while the lane has a job in flight */
                return res;
            }
        } else if (held != NULL) {
            start(held, 0);
            held = NULL;
        }
        if (jobs_in_flight() == 0 || taken >= FAST_BATCH) {
            drain();
            return -EINTR; /* nothing more now: trio waits for /dev/fuse again */
        }
        wait_for_more(fd);
    }
}

/* -- what Python calls (csvfs/fuse_shim.py FastPath) ---------------------- */

static int make_eventfds(void)
{
    if (done_fd < 0)
        done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (returned_fd < 0)
        returned_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return done_fd >= 0 && returned_fd >= 0 ? 0 : -errno;
}

/* Serve from the image open at fd, its data area at base; sector_size 0 for
 * the page cache, else O_DIRECT's; with `threads` workers (0: each request
 * on the trio thread, in turn). */
EXPORT int csvfs_fast_start(int fd, int64_t base, int64_t sector_size, int threads)
{
    int res = make_eventfds();

    if (res < 0)
        return res;
    nfree = 0;
    for (int slot = SLOTS - 1; slot >= 0; slot--)
        free_slots[nfree++] = slot;
    stopping = 0;
    for (nworkers = 0; nworkers < threads && nworkers < 16; nworkers++)
        if (pthread_create(&workers[nworkers], NULL, work, NULL) != 0)
            break;
    sync_fd = fd;
    syncer_running = pthread_create(&syncer, NULL, sync_work, NULL) == 0;
    data_base = base;
    sector = sector_size;
    deadline_ns = 0;
    image_fd = fd;
    return 0;
}

/* No request goes to the lane any more; the workers are gone. */
EXPORT void csvfs_fast_stop(void)
{
    image_fd = -1;
    drain();
    pthread_mutex_lock(&lock);
    stopping = 1;
    pthread_cond_broadcast(&work_ready);
    pthread_cond_broadcast(&sync_ready);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < nworkers; i++)
        pthread_join(workers[i], NULL);
    nworkers = 0;
    if (syncer_running)
        pthread_join(syncer, NULL); /* after the syncs queued, which it answers */
    syncer_running = 0;
}

/* The eventfd that says a job came back for Python to do (see below). */
EXPORT int csvfs_fast_returned_fd(void)
{
    return returned_fd;
}

/* A job whose pread or pwrite failed in a worker: its slot, or -1 if none,
 * and the request (the data of a write, in *data). Python does it again
 * and answers with csvfs_fast_reply. */
EXPORT int csvfs_fast_take_returned(uint32_t *opcode, uint64_t *fh, int64_t *offset,
                                    uint32_t *size, const char **data)
{
    struct job *job;
    int slot = -1;

    pthread_mutex_lock(&lock);
    if (nreturned > 0)
        slot = returned[--nreturned];
    pthread_mutex_unlock(&lock);
    if (slot < 0)
        return -1;
    job = &jobs[slot];
    *opcode = job->opcode;
    *fh = job->fh;
    *offset = job->offset;
    *size = job->size;
    *data = job->buffer;
    return slot;
}

/* Python's answer to a returned job: an errno, or the data (a read's), or
 * the size written (a write's); the slot is free again. */
EXPORT void csvfs_fast_reply(int slot, int error, const char *data, size_t length)
{
    struct job *job = &jobs[slot];
    struct write_out out = {(uint32_t)length, 0};

    if (error)
        reply(fuse_fd, job->unique, error, NULL, 0);
    else if (job->opcode == OP_FSYNC)
        reply(fuse_fd, job->unique, 0, NULL, 0);
    else if (job->opcode == OP_READ)
        reply(fuse_fd, job->unique, 0, data, length);
    else
        reply(fuse_fd, job->unique, 0, &out, sizeof(out));
    put_back(job);
}

EXPORT void csvfs_fast_fault(int on)
{
    __atomic_store_n(&injected_fault, on, __ATOMIC_RELAXED);
}

EXPORT void csvfs_fast_deadline(int64_t monotonic_ns)
{
    deadline_ns = monotonic_ns;
}

EXPORT void csvfs_fast_counts(uint64_t out[5])
{
    memcpy(out, counts, sizeof(counts));
}

EXPORT int csvfs_fast_handle(uint64_t fh, uint64_t ino, int writes)
{
    struct handle *handle = find_handle(fh);

    if (handle == NULL) {
        handle = calloc(1, sizeof(*handle));
        if (handle == NULL)
            return -ENOMEM;
        handle->fh = fh;
        handle->next = handles[bucket(fh)];
        handles[bucket(fh)] = handle;
    }
    handle->ino = ino;
    handle->writes = writes;
    return 0;
}

EXPORT void csvfs_fast_drop_handle(uint64_t fh)
{
    struct handle **link = &handles[bucket(fh)];

    while (*link != NULL && (*link)->fh != fh)
        link = &(*link)->next;
    if (*link != NULL) {
        struct handle *gone = *link;

        *link = gone->next;
        free(gone);
    }
}

/* Take a file's map, as flat triples (file_first, volume_first, count)
 * sorted by file_first; the dirty mtime carries over. */
EXPORT int csvfs_fast_file(uint64_t ino, int64_t size, int64_t granule, int sync_here, int note_stripes, const int64_t *triples,
                           size_t nruns, const int64_t *ask_pairs, size_t nasks)
{
    struct file *file = find_file(ino);
    struct run *runs = malloc((nruns ? nruns : 1) * sizeof(*runs));
    struct ask_run *asks = malloc((nasks ? nasks : 1) * sizeof(*asks));

    if (runs == NULL || asks == NULL) {
        free(runs);
        free(asks);
        return -ENOMEM;
    }
    memcpy(runs, triples, nruns * sizeof(*runs));
    memcpy(asks, ask_pairs, nasks * sizeof(*asks));
    if (file == NULL) {
        file = calloc(1, sizeof(*file));
        if (file == NULL) {
            free(runs);
            free(asks);
            return -ENOMEM;
        }
        file->ino = ino;
        file->next = files[bucket(ino)];
        files[bucket(ino)] = file;
    }
    free(file->runs);
    file->runs = runs;
    file->nruns = nruns;
    free(file->asks);
    file->asks = asks;
    file->nasks = nasks;
    file->size = size;
    file->granule = granule;
    file->sync_here = sync_here;
    file->note_stripes = note_stripes;
    return 0;
}

/* The stripes noted since the last take, as pairs (file granule, mask) in
 * `out`, up to `capacity` pairs: how many. Those are cleared; call again
 * until fewer than `capacity` come. The notes survive a new map of the file
 * but not its drop: take them first. */
EXPORT size_t csvfs_fast_take_stripes(uint64_t ino, uint64_t *out, size_t capacity)
{
    struct file *file = find_file(ino);
    size_t taken = 0;

    for (size_t index = 0; file != NULL && index < file->nstripes && taken < capacity; index++)
        if (file->stripes[index] != 0) {
            out[2 * taken] = index;
            out[2 * taken + 1] = file->stripes[index];
            file->stripes[index] = 0;
            taken++;
        }
    return taken;
}

/* The time of the last write served here, 0 if none since the last take. */
EXPORT int64_t csvfs_fast_take_mtime(uint64_t ino)
{
    struct file *file = find_file(ino);
    int64_t mtime = 0;

    if (file != NULL) {
        mtime = file->dirty_mtime_ns;
        file->dirty_mtime_ns = 0;
    }
    return mtime;
}

/* Python serves the file from now on; returns its dirty mtime, as above. */
EXPORT int64_t csvfs_fast_drop_file(uint64_t ino)
{
    struct file **link = &files[bucket(ino)];
    int64_t mtime = 0;

    while (*link != NULL && (*link)->ino != ino)
        link = &(*link)->next;
    if (*link != NULL) {
        struct file *gone = *link;

        *link = gone->next;
        mtime = gone->dirty_mtime_ns;
        free(gone->stripes);
        free(gone->asks);
        free(gone->runs);
        free(gone);
    }
    return mtime;
}
