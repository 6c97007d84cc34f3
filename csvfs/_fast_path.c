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
 *     (runs of file granule -> volume granule) and whether a write may go
 *     straight to it (no granule a snapshot holds, no change tracking);
 *   - a handle is here with whether its writes may come here (not O_APPEND,
 *     no set-id bits to clear first);
 *   - the deadline is the data path's valid_until (CLOCK_MONOTONIC), zero
 *     while a snapshot hold is on, the node is fenced or its I/O redirected.
 *
 * Anything else (a file or handle not here, a hole to write, a write past
 * the size, an unaligned O_DIRECT request, a failed pread or pwrite) goes to
 * Python unchanged, which then does exactly what it did before: the lane is
 * only ever a shortcut. A failed call is done again by Python, which sees
 * the error itself and switches the node to redirected I/O.
 *
 * Why the gate stays exact: the lane runs on pyfuse3's trio thread, inside
 * fuse_session_receive_buf, and Python changes the tables on that thread
 * too. When Python closes a gate (a pause, a hold, a fence) it removes the
 * file or zeroes the deadline in the same step, and no request is in the
 * lane at that moment, so none can pass afterwards.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_fast_path.h"

#define EXPORT __attribute__((visibility("default")))

/* The kernel's protocol (linux/fuse.h), under names of our own. */
#define OP_READ 15
#define OP_WRITE 16

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

struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct write_out {
    uint32_t size, padding;
};

#define LANE_MAX (1u << 20) /* the largest request served here */
#define BUCKETS 4096

struct run {
    int64_t file_first, volume_first, count;
};

struct file {
    uint64_t ino;
    int64_t size, granule;
    int writable;
    int64_t dirty_mtime_ns; /* the time of the last write served here */
    size_t nruns;
    struct run *runs; /* sorted by file_first */
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
static char *lane_buffer; /* page-aligned, LANE_MAX bytes */
static uint64_t counts[3]; /* reads, writes served; requests handed over */

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

static int check_piece(const struct file *file, int64_t position, char *at, int64_t length)
{
    (void)file, (void)at;
    return position >= 0 && aligned(position, length);
}

static int write_piece(const struct file *file, int64_t position, char *at, int64_t length)
{
    (void)file;
    return pwrite(image_fd, at, length, position) == length;
}

static void reply(int fd, uint64_t unique, const void *data, size_t length)
{
    struct out_header out = {sizeof(out) + length, 0, unique};
    struct iovec parts[2] = {{&out, sizeof(out)}, {(void *)data, length}};

    /* A failed reply (ENOENT: the request was interrupted meanwhile) is the
     * kernel's business, as it is when libfuse sends one. */
    (void)!writev(fd, parts, length ? 2 : 1);
}

static int serve_read(int fd, const struct in_header *in, const struct io_in *arg,
                      const struct file *file)
{
    int64_t offset = (int64_t)arg->offset, end = offset + arg->size;

    if (end > file->size)
        end = file->size;
    if (end < offset)
        end = offset;
    if (!walk(file, offset, end, lane_buffer, read_piece))
        return 0;
    reply(fd, in->unique, lane_buffer, end - offset);
    counts[0]++;
    return 1;
}

static int serve_write(int fd, const struct in_header *in, const struct io_in *arg,
                       struct file *file)
{
    int64_t offset = (int64_t)arg->offset, end = offset + arg->size;
    char *data = (char *)(arg + 1);
    struct write_out out = {arg->size, 0};

    if (!file->writable || end > file->size)
        return 0;
    if (in->len < sizeof(*in) + sizeof(*arg) + arg->size)
        return 0;
    /* Every piece first: a write goes here whole or not at all. */
    if (!walk(file, offset, end, data, check_piece))
        return 0;
    if (sector != 0) { /* O_DIRECT wants an aligned buffer */
        memcpy(lane_buffer, data, arg->size);
        data = lane_buffer;
    }
    if (!walk(file, offset, end, data, write_piece))
        return 0; /* Python writes it all again, and sees the error itself */
    file->dirty_mtime_ns = now_ns(CLOCK_REALTIME);
    reply(fd, in->unique, &out, sizeof(out));
    counts[1]++;
    return 1;
}

int csvfs_fast_serve(int fd, const void *request, size_t length)
{
    const struct in_header *in = request;
    const struct io_in *arg = (const struct io_in *)(in + 1);
    struct handle *handle;
    struct file *file;
    int served = 0;

    if (image_fd < 0 || length < sizeof(*in) + sizeof(*arg))
        return 0;
    if (in->opcode != OP_READ && in->opcode != OP_WRITE)
        return 0;
    if (arg->size > LANE_MAX || now_ns(CLOCK_MONOTONIC) >= deadline_ns)
        goto handed_over;
    handle = find_handle(arg->fh);
    file = handle != NULL ? find_file(handle->ino) : NULL;
    if (file == NULL)
        goto handed_over;
    if (in->opcode == OP_READ)
        served = serve_read(fd, in, arg, file);
    else if (handle->writes)
        served = serve_write(fd, in, arg, file);
handed_over:
    if (!served)
        counts[2]++;
    return served;
}

/* -- what Python calls (csvfs/fuse_shim.py FastPath) ---------------------- */

EXPORT int csvfs_fast_start(int fd, int64_t base, int64_t sector_size)
{
    if (lane_buffer == NULL && posix_memalign((void **)&lane_buffer, 4096, LANE_MAX) != 0)
        return -ENOMEM;
    data_base = base;
    sector = sector_size;
    deadline_ns = 0;
    image_fd = fd;
    return 0;
}

EXPORT void csvfs_fast_stop(void)
{
    image_fd = -1;
}

EXPORT void csvfs_fast_deadline(int64_t monotonic_ns)
{
    deadline_ns = monotonic_ns;
}

EXPORT void csvfs_fast_counts(uint64_t out[3])
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
EXPORT int csvfs_fast_file(uint64_t ino, int64_t size, int64_t granule, int writable,
                           const int64_t *triples, size_t nruns)
{
    struct file *file = find_file(ino);
    struct run *runs = malloc((nruns ? nruns : 1) * sizeof(*runs));

    if (runs == NULL)
        return -ENOMEM;
    memcpy(runs, triples, nruns * sizeof(*runs));
    if (file == NULL) {
        file = calloc(1, sizeof(*file));
        if (file == NULL) {
            free(runs);
            return -ENOMEM;
        }
        file->ino = ino;
        file->next = files[bucket(ino)];
        files[bucket(ino)] = file;
    }
    free(file->runs);
    file->runs = runs;
    file->nruns = nruns;
    file->size = size;
    file->granule = granule;
    file->writable = writable;
    return 0;
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
        free(gone->runs);
        free(gone);
    }
    return mtime;
}
