"""``tests.wire``: captures built byte by byte (every reassembly and TLS case, each link type), then
one real ``tcpdump -i lo`` capture of a TLS and a plaintext connection, so the reader is checked
against what tcpdump actually writes, not only against what these tests think it writes."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import random
import shutil
import socket
import ssl
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.wire import Capture, read_pcap

CLIENT, SERVER = ("127.0.0.1", 50123), ("127.0.0.1", 8443)
CLIENT6, SERVER6 = ("::1", 50124), ("::1", 8443)
V4, V6 = (CLIENT, SERVER), (CLIENT6, SERVER6)
SYN, PSH_ACK = 0x02, 0x18


def record(kind: int, size: int) -> bytes:
    """One TLS 1.2-framed record of ``size`` body bytes."""
    return bytes([kind]) + b"\x03\x03" + size.to_bytes(2, "big") + bytes(size)


RECORDS = record(22, 100) + record(20, 1) + record(23, 5000) + record(23, 17000) + record(21, 2)


def ip_packet(src: tuple[str, int], dst: tuple[str, int], seq: int, data: bytes, flags: int):
    """An IPv4 or IPv6 packet holding one TCP segment (checksums left zero: nothing checks them)."""
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq % 2**32, 0, 5 << 4, flags, 65535, 0, 0)
    a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if a.version == 4:
        head = struct.pack("!BBHHHBBH", 0x45, 0, 40 + len(data), 0, 0x4000, 64, 6, 0)
        return head + a.packed + b.packed + tcp + data
    return struct.pack("!IHBB", 6 << 28, 20 + len(data), 6, 64) + a.packed + b.packed + tcp + data


def frame(link: int, ip: bytes) -> bytes:
    """``ip`` behind the link-layer header of ``link`` (Ethernet, SLL, SLL2, BSD loopback, raw)."""
    ethertype = b"\x08\x00" if ip[0] >> 4 == 4 else b"\x86\xdd"
    return {
        1: bytes(12) + ethertype,
        113: struct.pack("!HHH8s", 0, 772, 0, b"") + ethertype,
        276: ethertype + struct.pack("!HIHBB8s", 0, 1, 772, 0, 0, b""),
        0: struct.pack("<I", 2 if ip[0] >> 4 == 4 else 30),
    }.get(link, b"") + ip


def pcap(frames: list[bytes], link: int = 1, order: str = "<", nano: bool = False) -> bytes:
    """A classic pcap file of ``frames``."""
    out = struct.pack(
        order + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, 65535, link
    )
    for i, f in enumerate(frames):
        out += struct.pack(order + "IIII", i, 0, len(f), len(f)) + f
    return out


def flow(data: bytes, src=CLIENT, dst=SERVER, isn=1000, size=1400, syn=True) -> list[tuple]:
    """``(src, dst, seq, payload, flags)`` for ``data`` sent in ``size``-byte segments."""
    segs = [(src, dst, isn, b"", SYN)] if syn else []
    return segs + [
        (src, dst, isn + 1 + i, data[i : i + size], PSH_ACK) for i in range(0, len(data), size)
    ]


def capture(tmp_path, segments: list[tuple], link: int = 1, **kw):
    path = tmp_path / "cap.pcap"
    path.write_bytes(pcap([frame(link, ip_packet(*s)) for s in segments], link, **kw))
    return read_pcap(path)


@pytest.mark.parametrize("syn", [True, False])
@pytest.mark.parametrize(("order", "nano"), [("<", False), (">", False), ("<", True), (">", True)])
def test_tls_reassembled_out_of_order_with_retransmission(tmp_path, order, nano, syn):
    """Segments shuffled, one resent whole, one overlapping two others; sequence numbers wrap."""
    segs = flow(RECORDS, isn=2**32 - 3000, syn=syn)
    data = segs[syn:]
    random.Random(0).shuffle(data)
    overlap = (CLIENT, SERVER, 2**32 - 3000 + 1 + 700, RECORDS[700:2100], PSH_ACK)
    report = capture(tmp_path, segs[:syn] + data + [data[3], overlap], order=order, nano=nano)
    [s] = report.streams
    assert (s.src, s.dst, s.payload_bytes) == (CLIENT, SERVER, len(RECORDS))
    assert (s.tls_records, s.tls_types) == (5, {22: 1, 20: 1, 23: 2, 21: 1})
    assert (s.non_tls, s.truncated_tail, report.non_tls) == ("", 0, [])
    assert report.packets == len(segs) + 2


def test_plaintext_http2_is_flagged(tmp_path):
    """gRPC without TLS: the client's connection preface and the server's SETTINGS frame."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    settings = bytes([0, 0, 6, 4, 0, 0, 0, 0, 0]) + bytes(6)
    report = capture(tmp_path, flow(preface) + flow(settings, src=SERVER, dst=CLIENT, isn=7))
    assert len(report.streams) == 2
    assert all(s.non_tls.startswith("offset 0: plaintext HTTP/2") for s in report.streams)
    assert report.non_tls[0].startswith("127.0.0.1:50123->127.0.0.1:8443: offset 0: plaintext")


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b"POST /v1/fleet/register-node HTTP/1.1\r\n", "plaintext HTTP/1 (a POST request)"),
        (b"G3T", "byte 0x47 is not a TLS content type (plaintext?)"),
        (b"\x17\x02\x00\x00\x01x", "version 0x0200 is not TLS 1.0-1.3"),
        (b"\x17\x03\x03\xff\xff", "record length 65535 exceeds 18432"),
    ],
)
def test_garbage_after_records_is_flagged_at_its_offset(tmp_path, tail, reason):
    [s] = capture(tmp_path, flow(RECORDS + tail)).streams
    assert s.non_tls == f"offset {len(RECORDS)}: {reason}"
    assert (s.tls_records, s.payload_bytes) == (5, len(RECORDS) + len(tail))


@pytest.mark.parametrize("cut", [3, 3000])
def test_capture_ending_mid_record_is_a_tail_not_an_error(tmp_path, cut):
    """The last record (or its header) cut off, and the last pcap record itself half written."""
    segs = flow(RECORDS + record(23, 10_000)[:cut])
    path = tmp_path / "cut.pcap"
    half_written = struct.pack("<IIII", 9, 0, 100, 100) + bytes(10)
    path.write_bytes(pcap([frame(1, ip_packet(*s)) for s in segs]) + half_written)
    [s] = read_pcap(path).streams
    assert (s.non_tls, s.truncated_tail, s.tls_records) == ("", cut, 5)


def test_bytes_to_and_from_a_port(tmp_path):
    other = ("127.0.0.1", 9443)
    segs = flow(RECORDS) + flow(record(23, 3000), src=SERVER, dst=CLIENT, isn=9)
    segs += flow(record(23, 700), dst=other) + [(CLIENT, SERVER, 1001, b"", PSH_ACK)]
    report = capture(tmp_path, segs)
    assert report.bytes_to(8443) == report.bytes_from(50123) - 705 == len(RECORDS)
    assert (report.bytes_from(8443), report.bytes_to(9443), report.bytes_to(1)) == (3005, 705, 0)
    assert report.payload_bytes == len(RECORDS) + 3005 + 705
    assert len(report.streams) == 3


def test_a_gap_is_reported(tmp_path):
    segs = flow(RECORDS)
    [s] = capture(tmp_path, segs[:3] + segs[4:]).streams
    assert s.non_tls == "gap of 1400 bytes at offset 2800 (capture lost packets)"
    assert (s.payload_bytes, s.truncated_tail) == (len(RECORDS) - 1400, 0)


@pytest.mark.parametrize(("link", "ends"), [(113, V6), (276, V6), (0, V4), (101, V6), (12, V4)])
def test_link_types_and_ipv6(tmp_path, link, ends):
    """``-i any`` (SLL, SLL2), BSD loopback and raw IP; a UDP packet among them is not counted."""
    udp = bytearray(ip_packet(*ends, 5, b"x", 0))
    udp[6 if ends is V6 else 9] = 17  # the IP protocol / next-header byte: UDP
    path = tmp_path / "cap.pcap"
    frames = [frame(link, ip_packet(*s)) for s in flow(b"PRI * HTTP/2.0\r\n", *ends)]
    path.write_bytes(pcap([frame(link, bytes(udp)), *frames], link))
    report = read_pcap(path)
    assert report.packets == 2 and [s.src for s in report.streams] == [ends[0]]
    want = "[::1]:50124->[::1]:8443" if ends is V6 else "127.0.0.1:50123->127.0.0.1:8443"
    assert report.streams[0].non_tls.startswith("offset 0: plaintext HTTP/2")
    assert report.non_tls == [f"{want}: {report.streams[0].non_tls}"]


def test_reused_four_tuple_is_a_new_stream_and_pcapng_is_refused(tmp_path):
    segs = flow(RECORDS, isn=10) + flow(b"GET /", isn=99_999)
    report = capture(tmp_path, segs + [segs[-1]])  # the retransmitted last segment joins it
    first, second = report.streams
    assert (first.tls_records, first.non_tls, second.payload_bytes) == (5, "", 5)
    assert second.non_tls == "offset 0: plaintext HTTP/1 (a GET request)"
    (tmp_path / "x.pcapng").write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))
    with pytest.raises(ValueError, match="pcapng"):
        read_pcap(tmp_path / "x.pcapng")


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 16, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _echo_once(listener: socket.socket, n: int, wrap) -> None:
    """Accept one connection, read ``n`` bytes, send them back."""
    conn, _ = listener.accept()
    conn.settimeout(20)
    with wrap(conn) as s:
        s.sendall(_recv(s, n))


def _plain(sock: socket.socket) -> socket.socket:
    return sock


def _exchange(port: int, payload: bytes, wrap) -> bytes:
    with wrap(socket.create_connection(("127.0.0.1", port), timeout=20)) as s:
        s.sendall(payload)
        return _recv(s, len(payload))


@pytest.mark.skipif(
    shutil.which("tcpdump") is None or os.geteuid() != 0, reason="needs tcpdump, run as root"
)
def test_real_tcpdump_capture_of_tls_and_plaintext(tmp_path):
    """~200 KB each way over TLS (Python ``ssl``), and a plaintext HTTP/2-looking connection."""
    n, cert, key = 200_000, *_self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    tls_server = functools.partial(server_ctx.wrap_socket, server_side=True)
    tls_client = functools.partial(client_ctx.wrap_socket, server_hostname="127.0.0.1")
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    tls_port, plain_port = (sock.getsockname()[1] for sock in listeners)
    try:
        with Capture(tmp_path / "lo.pcap", [tls_port, plain_port]) as capture:
            sent = os.urandom(n)
            preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(1000)
            with ThreadPoolExecutor(2) as pool:
                servers = [
                    pool.submit(_echo_once, listeners[0], n, tls_server),
                    pool.submit(_echo_once, listeners[1], len(preface), _plain),
                ]
                assert _exchange(tls_port, sent, tls_client) == sent
                assert _exchange(plain_port, preface, _plain) == preface
                [f.result(timeout=30) for f in servers]
            report = capture.stop()
    finally:
        for sock in listeners:
            sock.close()
    tls = [s for s in report.streams if tls_port in (s.src[1], s.dst[1])]
    plaintext = [s for s in report.streams if plain_port in (s.src[1], s.dst[1])]
    assert len(tls) == len(plaintext) == 2, report.streams
    assert [s.non_tls for s in tls] == ["", ""], report.non_tls
    assert sum(s.payload_bytes for s in tls) >= 2 * n and min(s.payload_bytes for s in tls) >= n
    assert all({22, 23} <= set(s.tls_types) for s in tls)
    assert all("plaintext HTTP/2" in s.non_tls for s in plaintext)
    assert len(report.non_tls) == 2
