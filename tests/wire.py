"""What crossed the wire: read a tcpdump capture and say whether every TCP payload byte was TLS.

A deployment test captures loopback traffic (``tcpdump -i lo -w FILE -U 'tcp port P ...'``) while
the sites and the server talk, then asks the capture what the code under test cannot be trusted to
say about itself: was any byte sent in the clear, and how many bytes crossed each way. Standard
library only, so the same capture reads the same on any machine. Each TCP direction is reassembled
here (ordered by sequence number, retransmitted bytes dropped) because one TLS record spans many
segments and a capture holds duplicates; a record boundary can only be checked on the whole stream.
"""

from __future__ import annotations

import ipaddress
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TLS_TYPES = frozenset({20, 21, 22, 23, 24})  # ccs, alert, handshake, application_data, heartbeat
MAX_RECORD = 2**14 + 2048  # TLSCiphertext.length limit (RFC 5246 §6.2.3)
H2_PREFACE = b"PRI * HTTP/2.0"  # what a gRPC client sends first when it speaks without TLS
# what an HTTP/1.x client sends first (Flower's REST transport, e.g. `flower-supernode --insecure`)
HTTP1_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ")
SYN = 0x02

# First four bytes of a classic pcap file -> byte order (microsecond and nanosecond timestamps).
_MAGIC = {
    b"\xd4\xc3\xb2\xa1": "<",
    b"\x4d\x3c\xb2\xa1": "<",
    b"\xa1\xb2\xc3\xd4": ">",
    b"\xa1\xb2\x3c\x4d": ">",
}
_LINKS = (1, 113, 276, 0, 101, 12)  # Ethernet, Linux SLL, SLL2, BSD loopback, raw IP (twice)
_IP_ETHERTYPES = (b"\x08\x00", b"\x86\xdd")


@dataclass
class Stream:
    """One direction of one TCP connection, as reassembled from the capture."""

    src: tuple[str, int]
    dst: tuple[str, int]
    payload_bytes: int  # unique payload bytes: retransmissions and overlaps counted once
    tls_records: int
    tls_types: dict[int, int]
    non_tls: str  # "" when the whole stream is a sequence of TLS records; else why not
    truncated_tail: int  # bytes of a last record cut off by the end of the capture (not an error)


@dataclass
class WireReport:
    """Every TCP direction on a capture, in the order each was first seen."""

    packets: int  # TCP packets read
    streams: list[Stream] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        return sum(s.payload_bytes for s in self.streams)

    @property
    def non_tls(self) -> list[str]:
        """``"src->dst: reason"`` for every stream that is not all TLS."""
        return [f"{_ep(s.src)}->{_ep(s.dst)}: {s.non_tls}" for s in self.streams if s.non_tls]

    def bytes_to(self, port: int) -> int:
        return sum(s.payload_bytes for s in self.streams if s.dst[1] == port)

    def bytes_from(self, port: int) -> int:
        return sum(s.payload_bytes for s in self.streams if s.src[1] == port)


def read_pcap(path: str | Path) -> WireReport:
    """Read a classic pcap file (as ``tcpdump -w`` writes it) into one `Stream` per TCP direction.

    A last packet record cut short (tcpdump killed while writing) ends the capture quietly.
    """
    raw = memoryview(Path(path).read_bytes())
    order = _MAGIC.get(bytes(raw[:4]))
    if order is None or len(raw) < 24:
        kind = "pcapng" if raw[:4] == b"\x0a\x0d\x0d\x0a" else f"magic {bytes(raw[:4]).hex()}"
        raise ValueError(f"{path}: not a classic pcap file ({kind}); write it with tcpdump -w")
    link = struct.unpack_from(order + "I", raw, 20)[0] & 0xFFFF  # upper bits: FCS information
    if link not in _LINKS:
        raise ValueError(f"{path}: link type {link} is not one of {sorted(_LINKS)}")
    live: dict[tuple, _Direction] = {}
    seen: list[_Direction] = []
    packets, off = 0, 24
    while off + 16 <= len(raw):
        (incl,) = struct.unpack_from(order + "I", raw, off + 8)
        frame = raw[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < incl:
            break
        at = _ip_offset(link, frame)
        seg = _tcp_segment(frame[at:]) if at is not None else None
        if seg is None:
            continue
        packets += 1
        src, dst, seq, flags, payload = seg
        d = live.get((src, dst))
        if d is None or d.starts_new(seq, flags):
            d = live[(src, dst)] = _Direction(src, dst)
            seen.append(d)
        d.add(seq, flags, payload)
    return WireReport(packets, [d.finish() for d in seen])


def _ip_offset(link: int, frame: memoryview) -> int | None:
    """Where the IP header starts in a frame of this link type; None if the frame carries no IP."""
    if link == 1:
        at = 12
        while frame[at : at + 2] in (b"\x81\x00", b"\x88\xa8"):  # 802.1Q / 802.1ad tags
            at += 4
        kind, at = frame[at : at + 2], at + 2
    elif link == 113:
        kind, at = frame[14:16], 16
    elif link == 276:
        kind, at = frame[0:2], 20
    else:  # BSD loopback (a 4-byte address family in the writer's byte order) or raw IP
        return 4 if link == 0 else 0
    return at if kind in _IP_ETHERTYPES else None


def _tcp_segment(ip: memoryview) -> tuple | None:
    """``(src, dst, seq, flags, payload)`` of an IPv4/IPv6 TCP packet; None for anything else."""
    version = ip[0] >> 4 if len(ip) >= 20 else 0
    if version == 4:
        if int.from_bytes(ip[6:8], "big") & 0x3FFF:  # a fragment: TCP over it is not reassembled
            return None
        proto, hdr, addrs = ip[9], (ip[0] & 0x0F) * 4, (ip[12:16], ip[16:20])
        end = int.from_bytes(ip[2:4], "big") or len(ip)  # 0: a GSO super-packet; trims padding
    elif version == 6 and len(ip) >= 40:
        proto, hdr, addrs = ip[6], 40, (ip[8:24], ip[24:40])
        end = 40 + int.from_bytes(ip[4:6], "big") if ip[4:6] != b"\0\0" else len(ip)
        while proto in (0, 43, 60) and hdr + 2 <= len(ip):  # hop-by-hop, routing, dest. options
            proto, hdr = ip[hdr], hdr + (ip[hdr + 1] + 1) * 8
    else:
        return None
    tcp = ip[hdr:end]
    if proto != 6 or len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", tcp)
    src, dst = (str(ipaddress.ip_address(bytes(a))) for a in addrs)
    return (src, sport), (dst, dport), seq, tcp[13], tcp[(tcp[12] >> 4) * 4 :]


class _Direction:
    """One direction of one connection while the capture is read: payload by stream position.

    Sequence numbers are unwrapped against the previous segment's (nearest 32-bit distance), so a
    stream crossing 2**32, or one longer than 4 GiB, keeps increasing positions.
    """

    def __init__(self, src: tuple[str, int], dst: tuple[str, int]):
        self.src, self.dst = src, dst
        self.syn_seq: int | None = None  # raw ISN, to tell a reused 4-tuple from a SYN resent
        self.start: int | None = None  # position of the first payload byte (ISN + 1)
        self.last: tuple[int, int] | None = None  # (raw seq, its position)
        self.segments: list[tuple[int, memoryview]] = []

    def starts_new(self, seq: int, flags: int) -> bool:
        """A SYN with another ISN on the same 4-tuple: a new connection (port reuse)."""
        if not flags & SYN:
            return False
        return self.syn_seq != seq if self.syn_seq is not None else bool(self.segments)

    def add(self, seq: int, flags: int, payload: memoryview) -> None:
        pos = seq
        if self.last is not None:
            raw, prev = self.last
            pos = prev + (seq - raw + 2**31) % 2**32 - 2**31
        self.last = (seq, pos)
        if flags & SYN:
            self.syn_seq, self.start, pos = seq, pos + 1, pos + 1  # data on a SYN follows the ISN
        if payload:
            self.segments.append((pos, payload))

    def finish(self) -> Stream:
        """Reassemble in sequence order, each byte once; check the bytes before any gap as TLS."""
        segs = sorted(self.segments, key=lambda s: s[0])
        start = self.start if self.start is not None else segs[0][0] if segs else 0
        data, cursor, gap_at, gap = bytearray(), start, None, ""
        for pos, chunk in segs:
            if pos + len(chunk) <= cursor:
                continue
            if pos > cursor:
                if gap_at is None:
                    gap_at = len(data)
                    gap = f"gap of {pos - cursor} bytes at offset {gap_at} (capture lost packets)"
                cursor = pos
            data += chunk[cursor - pos :]
            cursor = pos + len(chunk)
        records, types, reason, tail = _tls_records(data if gap_at is None else data[:gap_at])
        if gap:
            reason, tail = reason or gap, 0
        return Stream(self.src, self.dst, len(data), records, types, reason, tail)


def _tls_records(data: bytes | bytearray) -> tuple[int, dict[int, int], str, int]:
    """Walk ``data`` as TLS records: (records, count per type, why not TLS or "", cut-off tail)."""
    off, types = 0, {}
    while off < len(data):
        head = bytes(data[off : off + 16])
        reason = _why_not_tls(head)
        if reason:
            return sum(types.values()), types, f"offset {off}: {reason}", 0
        end = off + 5 + int.from_bytes(head[3:5], "big")
        if len(head) < 5 or end > len(data):
            return sum(types.values()), types, "", len(data) - off
        types[head[0]] = types.get(head[0], 0) + 1
        off = end
    return sum(types.values()), types, "", 0


def _why_not_tls(head: bytes) -> str:
    """Why the bytes at a record boundary cannot start a TLS record; "" if they can, so far."""
    if head.startswith(H2_PREFACE):
        return "plaintext HTTP/2 (client connection preface 'PRI * HTTP/2.0')"
    if head.startswith(HTTP1_METHODS):
        return f"plaintext HTTP/1 (a {head.split(b' ', 1)[0].decode()} request)"
    if head[0] not in TLS_TYPES:
        if len(head) >= 9 and head[3] == 0x04 and head[5:9] == b"\0\0\0\0":
            return "plaintext HTTP/2 (a SETTINGS frame)"
        return f"byte 0x{head[0]:02x} is not a TLS content type (plaintext?)"
    if len(head) >= 3 and not 0x0301 <= int.from_bytes(head[1:3], "big") <= 0x0304:
        return f"version 0x{head[1:3].hex()} is not TLS 1.0-1.3"
    if len(head) >= 5 and int.from_bytes(head[3:5], "big") > MAX_RECORD:
        return f"record length {int.from_bytes(head[3:5], 'big')} exceeds {MAX_RECORD}"
    return ""


def _ep(endpoint: tuple[str, int]) -> str:
    ip, port = endpoint
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Capture:
    """``tcpdump -i lo`` on some TCP ports, from :meth:`start` until :meth:`stop` returns what it
    saw. Needs tcpdump and root; always stop it (``with Capture(...) as cap``)."""

    def __init__(self, path: Path, ports: list[int]):
        self.path, self.ports = Path(path), ports
        self.proc: subprocess.Popen | None = None
        self.summary = ""  # tcpdump's last words: packets captured, dropped by the kernel

    def __enter__(self) -> Capture:
        bpf = " or ".join(f"tcp port {p}" for p in self.ports)
        # a 256 MB kernel buffer: on a busy 2-core machine tcpdump is not always scheduled in
        # time, and a full buffer loses packets (a gap in a stream)
        argv = ["tcpdump", "-i", "lo", "-B", "262144", "-w", str(self.path), "-U", bpf]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        banner = ""
        while "listening on" not in banner:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"tcpdump exited before listening: {banner}")
            banner += line
        return self

    def __exit__(self, *exc) -> None:
        self._end()

    def _end(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.summary = " ".join((err or "").split())

    def stop(self, settle: float = 2.0, timeout: float = 20.0) -> WireReport:
        """Stop once the capture file has not grown for ``settle`` seconds (tcpdump receives
        packets from the kernel in blocks, late, and drops unread ones on SIGINT), then read it."""
        deadline, size, still_since = time.monotonic() + timeout, -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.path.stat().st_size if self.path.exists() else 0
            if now != size:
                size, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= settle:
                break
            time.sleep(0.2)
        self._end()
        return read_pcap(self.path)
