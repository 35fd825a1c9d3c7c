"""A tiny server for the lab: every TCP connection gets an HTTP answer and every UDP
datagram an echo, both naming the client address the server saw ("ip:port"), which is
what the NAT tests assert on (Kube-OVN's e2e tests use agnhost /clientip the same way).
With --tag, answers end in " @tag", to tell which of several servers answered."""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    suffix = f" @{args.tag}" if args.tag else ""
    selector = selectors.DefaultSelector()
    # One socket per family (IPv6 only on IPv6): an IPv4 client is reported as itself,
    # not as an IPv4-mapped IPv6 address.
    for family, anywhere in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        if family == socket.AF_INET6 and not socket.has_ipv6:
            continue
        for port in args.tcp:
            listener = socket.create_server((anywhere, port), family=family, reuse_port=True, backlog=512)
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ, "tcp")
        for port in args.udp:
            datagram = socket.socket(family, socket.SOCK_DGRAM)
            datagram.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                datagram.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            datagram.bind((anywhere, port))
            selector.register(datagram, selectors.EVENT_READ, "udp")
    while True:
        for key, _ in selector.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data == "udp":
                _, peer = sock.recvfrom(65535)
                # No route back (an upstream router between a withdrawal and the next
                # announcement) loses the answer, as on any host; it must not end the
                # server and every connection it holds.
                with contextlib.suppress(OSError):
                    sock.sendto(f"{peer[0]}:{peer[1]}{suffix}".encode(), peer)
            elif key.data == "tcp":
                conn, peer = sock.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ, ("conn", peer))
            else:
                _answer(selector, sock, key.data[1], suffix)


def _answer(selector: selectors.BaseSelector, conn: socket.socket, peer: tuple[str, int], suffix: str) -> None:
    try:
        data = conn.recv(65535)
    except OSError:
        data = b""
    if not data:
        selector.unregister(conn)
        conn.close()
        return
    if data.startswith((b"GET ", b"HEAD ")):
        body = f"{peer[0]}:{peer[1]}{suffix}".encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        conn.sendall(head + body)
        selector.unregister(conn)
        conn.close()
    else:
        conn.sendall(data)  # raw TCP: echo, for long-lived streams


if __name__ == "__main__":
    main()
