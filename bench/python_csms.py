#!/usr/bin/env python3
"""The baseline for bench/compare_python.sh: a central system built the way
many projects start, with the `ocpp` package (mobilityhouse) on `websockets`,
one asyncio process, answering what `csms loadgen` sends (1.6 and 2.0.1).

It does what a minimal CSMS must and no more: schema validation (the
package's default), an answer per CALL, a transaction id per 1.6
StartTransaction. It keeps nothing durable (no WAL, no lake, no status
store), so the comparison flatters it; the benchmark says so.

Prints {"port": N} on stdout once listening; stops on SIGINT/SIGTERM.
"""

import argparse
import asyncio
import itertools
import json
import logging
import signal
import sys
from datetime import datetime, timezone

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call_result as r16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call_result as r201

TX_IDS = itertools.count(1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Station16(ChargePoint16):
    @on("BootNotification")
    async def boot(self, **_):
        return r16.BootNotification(current_time=now(), interval=60, status="Accepted")

    @on("Heartbeat")
    async def heartbeat(self, **_):
        return r16.Heartbeat(current_time=now())

    @on("StatusNotification")
    async def status(self, **_):
        return r16.StatusNotification()

    @on("MeterValues")
    async def meter(self, **_):
        return r16.MeterValues()

    @on("Authorize")
    async def authorize(self, **_):
        return r16.Authorize(id_tag_info={"status": "Accepted"})

    @on("StartTransaction")
    async def start_transaction(self, **_):
        return r16.StartTransaction(
            transaction_id=next(TX_IDS), id_tag_info={"status": "Accepted"}
        )

    @on("StopTransaction")
    async def stop_transaction(self, **_):
        return r16.StopTransaction()


class Station201(ChargePoint201):
    @on("BootNotification")
    async def boot(self, **_):
        return r201.BootNotification(current_time=now(), interval=60, status="Accepted")

    @on("Heartbeat")
    async def heartbeat(self, **_):
        return r201.Heartbeat(current_time=now())

    @on("StatusNotification")
    async def status(self, **_):
        return r201.StatusNotification()

    @on("MeterValues")
    async def meter(self, **_):
        return r201.MeterValues()

    @on("Authorize")
    async def authorize(self, **_):
        return r201.Authorize(id_token_info={"status": "Accepted"})

    @on("TransactionEvent")
    async def transaction(self, **_):
        return r201.TransactionEvent()


async def handler(ws):
    station = ws.request.path.rstrip("/").rsplit("/", 1)[-1]
    cls = Station201 if ws.subprotocol in ("ocpp2.0.1", "ocpp2.1") else Station16
    try:
        await cls(station, ws).start()
    except websockets.exceptions.ConnectionClosed:
        pass
    except Exception:
        logging.exception("station %s", station)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ocpp").setLevel(logging.WARNING)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with websockets.serve(
        handler,
        args.host,
        args.port,
        subprotocols=["ocpp2.0.1", "ocpp1.6"],
        ping_interval=None,
        max_queue=16,
        backlog=4096,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await stop


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
