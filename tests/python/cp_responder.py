#!/usr/bin/env python3
"""A charge point that answers CSMS-initiated CALLs, for command tests.

Connects, sends BootNotification, prints one JSON line {"ready": true}, then
answers Reset, TriggerMessage, UnlockConnector, DataTransfer and (1.6)
GetConfiguration, ChangeConfiguration, RemoteStart/StopTransaction or (2.x)
GetVariables, SetVariables, RequestStart/StopTransaction, GetBaseReport,
printing one JSON line {"received": ACTION, "payload": {...}} per CALL
(payload keys in snake_case, as the `ocpp` package hands them over). The
`ocpp` package validates each incoming CALL and each answer against the OCA
schemas. Exits 0 after --max-calls CALLs or --duration seconds, and exits
non-zero if the connection fails.
"""

import argparse
import asyncio
import json
import sys

from ocpp.routing import on

from cp_common import basic_auth_headers, now_iso

import websockets

VERSIONS = {"ocpp1.6": "v16", "ocpp2.0.1": "v201", "ocpp2.1": "v21"}


def emit(obj):
    print(json.dumps(obj), flush=True)


def build_cp(subprotocol, state):
    import importlib

    mod = importlib.import_module(f"ocpp.{VERSIONS[subprotocol]}")
    result = importlib.import_module(f"ocpp.{VERSIONS[subprotocol]}.call_result")

    def record(action, payload):
        emit({"received": action, "payload": payload})
        state["count"] += 1
        if state["count"] >= state["max"]:
            # Let the answer go out before stopping.
            asyncio.get_running_loop().call_later(0.5, state["done"].set)

    class Common(mod.ChargePoint):
        @on("Reset")
        def on_reset(self, **kw):
            record("Reset", kw)
            return result.Reset(status="Accepted")

        @on("TriggerMessage")
        def on_trigger(self, **kw):
            record("TriggerMessage", kw)
            return result.TriggerMessage(status="Accepted")

        @on("UnlockConnector")
        def on_unlock(self, **kw):
            record("UnlockConnector", kw)
            return result.UnlockConnector(status="Unlocked")

        @on("DataTransfer")
        def on_data_transfer(self, **kw):
            record("DataTransfer", kw)
            return result.DataTransfer(status="Accepted", data="pong")

    if subprotocol == "ocpp1.6":

        class CP(Common):
            @on("GetConfiguration")
            def on_get_configuration(self, **kw):
                record("GetConfiguration", kw)
                keys = kw.get("key") or ["HeartbeatInterval"]
                return result.GetConfiguration(configuration_key=[{"key": k, "readonly": False, "value": "300"} for k in keys])

            @on("ChangeConfiguration")
            def on_change_configuration(self, **kw):
                record("ChangeConfiguration", kw)
                return result.ChangeConfiguration(status="Accepted")

            @on("RemoteStartTransaction")
            def on_remote_start(self, **kw):
                record("RemoteStartTransaction", kw)
                return result.RemoteStartTransaction(status="Accepted")

            @on("RemoteStopTransaction")
            def on_remote_stop(self, **kw):
                record("RemoteStopTransaction", kw)
                return result.RemoteStopTransaction(status="Accepted")

    else:

        class CP(Common):
            @on("GetVariables")
            def on_get_variables(self, get_variable_data, **kw):
                record("GetVariables", {"get_variable_data": get_variable_data, **kw})
                return result.GetVariables(
                    get_variable_result=[
                        {"attribute_status": "Accepted", "attribute_value": "300", "component": d["component"], "variable": d["variable"]}
                        for d in get_variable_data
                    ]
                )

            @on("SetVariables")
            def on_set_variables(self, set_variable_data, **kw):
                record("SetVariables", {"set_variable_data": set_variable_data, **kw})
                return result.SetVariables(
                    set_variable_result=[
                        {"attribute_status": "Accepted", "component": d["component"], "variable": d["variable"]} for d in set_variable_data
                    ]
                )

            @on("RequestStartTransaction")
            def on_request_start(self, **kw):
                record("RequestStartTransaction", kw)
                return result.RequestStartTransaction(status="Accepted")

            @on("RequestStopTransaction")
            def on_request_stop(self, **kw):
                record("RequestStopTransaction", kw)
                return result.RequestStopTransaction(status="Accepted")

            @on("GetBaseReport")
            def on_get_base_report(self, **kw):
                record("GetBaseReport", kw)
                return result.GetBaseReport(status="Accepted")

    return CP


async def main(args):
    state = {"count": 0, "max": args.max_calls, "done": asyncio.Event()}
    cls = build_cp(args.subprotocol, state)
    call = __import__(f"ocpp.{VERSIONS[args.subprotocol]}.call", fromlist=["call"])
    ws = await websockets.connect(
        args.url, subprotocols=[args.subprotocol], additional_headers=basic_auth_headers(args.station, args.password)
    )
    cp = cls(args.station, ws, response_timeout=args.timeout)
    reader = asyncio.create_task(cp.start())
    if args.subprotocol == "ocpp1.6":
        boot = call.BootNotification(charge_point_model="Responder", charge_point_vendor="E2E")
    else:
        boot = call.BootNotification(charging_station={"model": "Responder", "vendorName": "E2E"}, reason="PowerUp")
    answer = await cp.call(boot, suppress=False)
    emit({"ready": True, "boot_status": answer.status, "at": now_iso()})
    done = asyncio.create_task(state["done"].wait())
    finished, _ = await asyncio.wait({reader, done}, timeout=args.duration, return_when=asyncio.FIRST_COMPLETED)
    if reader in finished and reader.exception() is not None:
        raise reader.exception()
    reader.cancel()
    await ws.close()
    emit({"handled": state["count"]})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--station", required=True)
    p.add_argument("--password", default=None)
    p.add_argument("--subprotocol", default="ocpp2.0.1", choices=sorted(VERSIONS))
    p.add_argument("--max-calls", type=int, default=1)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()
    try:
        asyncio.run(main(a))
    except Exception as e:  # noqa: BLE001
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
