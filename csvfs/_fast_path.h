/* The data path's fast lane (_fast_path.c), as the shim's receive_buf calls it. */
#ifndef CSVFS_FAST_PATH_H
#define CSVFS_FAST_PATH_H

#include <stddef.h>

/* Answer one request from /dev/fuse (fd) if it is a read or write the lane
 * can serve whole: 1 if it did (the reply is sent), 0 to hand it to libfuse. */
int csvfs_fast_serve(int fd, const void *request, size_t length);

#endif
