/* The data path's fast lane (_fast_path.c), as the shim's receive_buf calls it. */
#ifndef CSVFS_FAST_PATH_H
#define CSVFS_FAST_PATH_H

typedef int (*receive_fn)(struct fuse_session *, struct fuse_buf *);

/* fuse_session_receive_buf with the lane in front: reads requests with
 * `receive` and keeps the reads and writes the lane can do whole, until one
 * it cannot (returned, for libfuse) or none is left (-EINTR). No job of the
 * lane is in flight when it returns. */
int csvfs_fast_receive(struct fuse_session *se, struct fuse_buf *buf, receive_fn receive);

#endif
