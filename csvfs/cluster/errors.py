"""Errors the coordinator hands back to nodes, shared by the service and the RPC layer."""

import errno

# The errno that says "I am not (or no longer) the coordinator: find the real one".
# The service never refuses a request with ENOTCONN for any other reason.
NOT_COORDINATOR = errno.ENOTCONN


class MetaError(Exception):
    """A request the coordinator refuses, with the errno the caller should see."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


class NotCoordinator(MetaError):
    """This node does not hold the coordinator role (any more); ask the one that does."""

    def __init__(self, message: str = "not the coordinator"):
        super().__init__(NOT_COORDINATOR, message)


def is_not_coordinator(exc: BaseException) -> bool:
    return isinstance(exc, MetaError) and exc.errno == NOT_COORDINATOR
