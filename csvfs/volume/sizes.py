"""Human sizes: parse '64M', '10G', '1T' and print bytes back the same way."""

from csvfs.volume.errors import UsageError

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary suffix (K, M, G, T, P; 'iB'/'B' allowed)."""
    raw = text.strip().upper()
    for tail in ("IB", "B"):
        if raw.endswith(tail) and len(raw) > len(tail) and (
            tail == "B" or raw[-len(tail) - 1].isalpha()
        ):
            raw = raw[: -len(tail)]
            break
    suffix = raw[-1:] if raw[-1:].isalpha() else ""
    number = raw[: len(raw) - len(suffix)]
    if suffix not in _SUFFIXES or not (number.isascii() and number.isdigit()):
        raise UsageError(f"invalid size {text!r}: expected a number with an optional K, M, G or T")
    return int(number) * _SUFFIXES[suffix]


def format_size(count: int) -> str:
    for suffix in ("P", "T", "G", "M", "K"):
        scale = _SUFFIXES[suffix]
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.1f}{suffix}"
    return f"{count}B"
