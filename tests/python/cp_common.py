"""Shared plumbing for the charge-point scripts used by the e2e tests.

The scripts use the real `ocpp` package (mobilityhouse), whose ChargePoint
validates every CALL it sends and every answer it gets against the OCA JSON
schemas, so a schema-invalid answer from the CSMS fails the script
independently of the CSMS's own validation.
"""

import argparse
import asyncio
import base64
import datetime as dt
import json
import sys

import websockets


def parse_args(description, default_version):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", required=True, help="ws://host:port/ocpp/STATION")
    p.add_argument("--station", required=True, help="station id (Basic-auth user)")
    p.add_argument("--password", default=None, help="Basic-auth password")
    p.add_argument("--subprotocol", default=default_version)
    p.add_argument("--id-tag", default="TAG-OK", help="a token the CSMS accepts")
    p.add_argument("--blocked-tag", default=None, help="a token the CSMS blocks")
    p.add_argument("--boot-status", default="Accepted", help="expected boot status")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per answer")
    return p.parse_args()


def now_iso():
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value):
    """Parses an OCPP date-time, failing the script if it is not one."""
    if not isinstance(value, str):
        raise AssertionError(f"not a date-time string: {value!r}")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def basic_auth_headers(station, password):
    if password is None:
        return {}
    token = base64.b64encode(f"{station}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def connect(args):
    ws = await websockets.connect(
        args.url,
        subprotocols=[args.subprotocol],
        additional_headers=basic_auth_headers(args.station, args.password),
        open_timeout=args.timeout,
    )
    if ws.subprotocol != args.subprotocol:
        raise AssertionError(f"server chose subprotocol {ws.subprotocol!r}, offered {args.subprotocol!r}")
    return ws


class Recorder:
    """Sends CALLs with predictable message ids and records them."""

    def __init__(self, cp, prefix):
        self.cp = cp
        self.prefix = prefix
        self.sent = []

    async def call(self, payload):
        unique_id = f"{self.prefix}-{len(self.sent) + 1}"
        action = type(payload).__name__
        self.sent.append({"id": unique_id, "action": action})
        # suppress=False: a CALLERROR raises instead of returning None.
        return await self.cp.call(payload, suppress=False, unique_id=unique_id)


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def run(main_coro_factory):
    """Runs the script's coroutine; prints the JSON summary or fails."""
    try:
        summary = asyncio.run(main_coro_factory())
    except Exception as e:  # noqa: BLE001 - every failure must exit non-zero
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        import traceback

        traceback.print_exc()
        sys.exit(1)
    print(json.dumps(summary))


def make_csr(common_name):
    """A real PEM CSR when `cryptography` is available, else a fixed one."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return "-----BEGIN CERTIFICATE REQUEST-----\nMIIBtest\n-----END CERTIFICATE REQUEST-----\n"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "e2e"),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()
