"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, storing every
accepted message as NNNN.eml (the bytes as received) plus NNNN.json (the
envelope: mail_from, rcpt_tos) in the directory given by --dir.

Prints one JSON line {"port": N} on stdout once it accepts connections, then
runs until killed or until stdin closes (so it dies with its parent test).

--fail-first N answers the first N DATA commands with a transient
"451" so tests can check that senders retry.
--auth USER:PASS requires AUTH (PLAIN/LOGIN, allowed without TLS here).
"""

import argparse
import asyncio
import json
import os
import socket
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Sink:
    def __init__(self, directory, fail_first):
        self.directory = directory
        self.fail_left = fail_first
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            if self.fail_left > 0:
                self.fail_left -= 1
                return "451 4.3.0 try again later (test sink)"
            self.count += 1
            n = self.count
        base = os.path.join(self.directory, f"{n:04d}")
        with open(base + ".json.tmp", "w") as f:
            json.dump({"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}, f)
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(base + ".json.tmp", base + ".json")
        # The .eml appears last: a reader that sees it sees both files.
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 stored"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--auth", default=None)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    kwargs = {}
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == user
                and auth_data.password.decode() == password
            )
            return AuthResult(success=ok, handled=False, auth_data=auth_data)

        kwargs.update(authenticator=authenticator, auth_require_tls=False, auth_required=True)

    sink = Sink(args.dir, args.fail_first)
    controller = None
    for _ in range(20):
        port = free_port()
        controller = Controller(sink, hostname="127.0.0.1", port=port, **kwargs)
        try:
            controller.start()
            break
        except Exception as e:  # port taken between choosing and binding
            print(f"smtp_sink: port {port}: {e}", file=sys.stderr)
            controller = None
    if controller is None:
        sys.exit("smtp_sink: could not start")
    print(json.dumps({"port": port}), flush=True)
    try:
        sys.stdin.read()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
