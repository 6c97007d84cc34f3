"""Errors the coordinator hands back to nodes, shared by the service and the RPC layer."""

import errno


class MetaError(Exception):
    """A request the coordinator refuses, with the errno the caller should see."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code
