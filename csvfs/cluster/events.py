"""The cluster event ring on the volume: election, recovery, warnings."""

from __future__ import annotations

import logging
import os
import time

from csvfs.volume import format as fmt
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

FOLLOW_INTERVAL = 0.2  # seconds between looks at the ring while following it


def read_events(volume: Volume) -> list[dict]:
    """Every intact event in the ring, oldest first."""
    region = volume.sb.events
    raw = volume.read(region.offset, region.length)
    events = []
    for offset in range(0, region.length, fmt.EVENT_RECORD_SIZE):
        chunk = raw[offset : offset + fmt.EVENT_RECORD_SIZE]
        if chunk[:4] != fmt.EVENT_MAGIC:
            continue
        try:
            event = fmt.unpack_block(chunk, fmt.EVENT_MAGIC)
        except fmt.FormatError:
            continue
        if isinstance(event, dict) and isinstance(event.get("seq"), int):
            events.append(event)
    return sorted(events, key=lambda event: event["seq"])


def follow(volume: Volume, interval: float = FOLLOW_INTERVAL):
    """Every event in the ring, then each new one as it comes (`csvfs events --follow`),
    forever. A gap in the numbers (the ring came round faster than we looked) yields
    {"missed": count} in its place."""
    last = 0
    while True:
        for event in read_events(volume):
            if event["seq"] <= last:
                continue
            if last and event["seq"] > last + 1:
                yield {"missed": event["seq"] - last - 1}
            last = event["seq"]
            yield event
        time.sleep(interval)


class EventLog:
    """Appends events; durability rides on the journal's next fdatasync."""

    def __init__(self, volume: Volume, node: str):
        self.volume = volume
        self.node = node
        existing = read_events(volume)
        self.next_seq = existing[-1]["seq"] + 1 if existing else 1

    def emit(self, kind: str, message: str, level: str = "info") -> None:
        event = {
            "seq": self.next_seq,
            "t": time.time_ns(),
            "node": self.node,
            "pid": os.getpid(),
            "kind": kind,
            "level": level,
            "msg": message,
        }
        self.next_seq += 1
        try:
            self.volume.write(fmt.event_slot_offset(self.volume.sb, event["seq"]),
                              fmt.encode_event(event))
        except OSError as exc:
            log.warning("cannot write event %r: %s", kind, exc)
        (log.warning if level == "warning" else log.info)("event %s: %s", kind, message)
