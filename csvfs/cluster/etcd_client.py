"""etcd, reached through its grpc-gateway JSON API with etcd3gw, over several endpoints.

This is the I/O half of election through etcd (csvfs/cluster/etcd_election.py has
the protocol). Calls are synchronous (etcd3gw uses requests): the node runs them
in a thread with `trio.to_thread.run_sync`, the command-line tools directly.

Several endpoints: a call goes to the endpoint that answered last; when it fails
to answer (refused, timed out, or "no leader"), the next one is tried, and the
call fails with EtcdUnavailable only when none answered. Every request has a
timeout, so a member that lost quorum (its linearizable reads wait) costs one
timeout, not a hang.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import re
from dataclasses import dataclass

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors

log = logging.getLogger(__name__)

SCHEME = "etcd://"
REQUEST_TIMEOUT = 1.0  # seconds, per request and endpoint
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_UNANSWERED = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
               etcd_errors.InternalServerError, requests.RequestException,
               ValueError)  # ValueError: a reply that is not JSON


class EtcdUnavailable(OSError):
    """No endpoint answered (all down, or none of them in a quorum)."""

    def __init__(self, message: str):
        super().__init__(errno.EHOSTUNREACH, message)

    def __str__(self) -> str:
        return self.strerror


class EtcdRefused(OSError):
    """etcd answered a request with an error (e.g. a lease it does not know)."""

    def __init__(self, message: str):
        super().__init__(errno.EREMOTEIO, message)

    def __str__(self) -> str:
        return self.strerror


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """`etcd://HOST:PORT[,HOST:PORT...]` as (host, port) pairs; ValueError with a
    message fit for the user when it is not that."""
    if not text.startswith(SCHEME):
        raise ValueError(f"--election {text!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    endpoints = []
    for part in text[len(SCHEME):].rstrip("/").split(","):
        match = _ENDPOINT.match(part.strip())
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"--election {text!r}: {part!r} is not HOST:PORT")
        endpoints.append((match.group(1).strip("[]"), int(match.group(2))))
    return endpoints


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix`."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


@dataclass
class KeyValue:
    key: str
    value: dict
    mod_revision: int
    lease: int


def _key_value(item: dict) -> KeyValue:
    raw = base64.b64decode(item.get("value", ""))
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    return KeyValue(base64.b64decode(item["key"]).decode(), value if isinstance(value, dict)
                    else {}, int(item.get("mod_revision", 0)), int(item.get("lease", 0)))


class Etcd:
    """A few etcd calls over a list of endpoints. Not for concurrent use: make one
    per thread of calls."""

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = REQUEST_TIMEOUT):
        self.clients = [etcd3gw.Etcd3Client(host, port, timeout=timeout, api_path="/v3/")
                        for host, port in endpoints]
        self.names = [f"{host}:{port}" for host, port in endpoints]
        self.current = 0

    def _post(self, path: str, body: dict) -> dict:
        failures = []
        for step in range(len(self.clients)):
            index = (self.current + step) % len(self.clients)
            client = self.clients[index]
            try:
                reply = client.post(client.get_url(path), json=body)
            except _UNANSWERED as exc:
                failures.append(f"{self.names[index]}: {_short(exc)}")
                continue
            except etcd_errors.Etcd3Exception as exc:  # etcd answered, with an error
                raise EtcdRefused(f"etcd {self.names[index]} refused {path}: "
                                  f"{_short(exc)}") from None
            if index != self.current:
                log.info("etcd: now using %s", self.names[index])
                self.current = index
            return reply
        raise EtcdUnavailable("no etcd endpoint answered (" + "; ".join(failures) + ")")

    # -- leases ------------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, TTL granted, which etcd may raise to its minimum)."""
        reply = self._post("/lease/grant", {"TTL": ttl, "ID": 0})
        return int(reply["ID"]), int(reply.get("TTL", ttl))

    def keep_alive(self, lease: int) -> int:
        """Renew; the TTL left, or -1 when the lease is gone (expired or revoked)."""
        reply = self._post("/lease/keepalive", {"ID": lease})
        return int(reply.get("result", {}).get("TTL", -1))

    def time_to_live(self, lease: int) -> int:
        """Whole seconds the lease has left (rounded down); -1 when it is gone."""
        reply = self._post("/kv/lease/timetolive", {"ID": lease})
        return int(reply.get("TTL", -1))

    def revoke(self, lease: int) -> None:
        """Revoke a lease, deleting its keys; a lease that is gone already is no error."""
        try:
            self._post("/lease/revoke", {"ID": lease})
        except EtcdRefused as exc:
            if "not found" not in str(exc).lower():
                raise

    # -- keys ----------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """A linearizable read of one key."""
        items = self._post("/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _key_value(items[0]) if items else None

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        """A linearizable read of every key under `prefix`."""
        reply = self._post("/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return [_key_value(item) for item in reply.get("kvs", [])]

    def put_if(self, key: str, mod_revision: int, value: dict, lease: int = 0) -> int | None:
        """Put `value` if the key's mod revision is still `mod_revision` (0: the key does
        not exist); the key's new revision, or None if the comparison failed."""
        compare = [{"key": _b64(key), "result": "EQUAL", "target": "MOD",
                    "mod_revision": mod_revision}]
        put = {"request_put": {"key": _b64(key), "value": _b64(json.dumps(value)),
                               "lease": lease}}
        reply = self._post("/kv/txn", {"compare": compare, "success": [put]})
        if not reply.get("succeeded"):
            return None
        return int(reply["header"]["revision"])

    def delete_if(self, key: str, mod_revision: int) -> bool:
        compare = [{"key": _b64(key), "result": "EQUAL", "target": "MOD",
                    "mod_revision": mod_revision}]
        delete = {"request_delete_range": {"key": _b64(key)}}
        reply = self._post("/kv/txn", {"compare": compare, "success": [delete]})
        return bool(reply.get("succeeded"))


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."
