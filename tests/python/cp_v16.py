#!/usr/bin/env python3
"""OCPP 1.6 charge point: runs a full session against the CSMS and checks
every answer. Prints a JSON summary ({"sent": [{"id", "action"}], ...});
exits non-zero on any failure (CALLERROR, schema-invalid answer, timeout,
wrong status)."""

import asyncio

from ocpp.v16 import ChargePoint, call

from cp_common import Recorder, connect, expect, make_csr, now_iso, parse_args, parse_time, run


async def main():
    args = parse_args(__doc__, "ocpp1.6")
    ws = await connect(args)
    cp = ChargePoint(args.station, ws, response_timeout=args.timeout)
    reader = asyncio.create_task(cp.start())
    r = Recorder(cp, "py16")
    try:
        boot = await r.call(
            call.BootNotification(
                charge_point_model="E2E-Model",
                charge_point_vendor="E2E-Vendor",
                charge_point_serial_number="SN-16",
                firmware_version="1.2.3",
            )
        )
        expect(boot.status == args.boot_status, f"boot status {boot.status}")
        expect(isinstance(boot.interval, int) and boot.interval > 0, f"boot interval {boot.interval}")
        parse_time(boot.current_time)

        hb = await r.call(call.Heartbeat())
        parse_time(hb.current_time)

        for connector, status, error in [(0, "Available", "NoError"), (1, "Available", "NoError"), (1, "Faulted", "GroundFailure"), (1, "Available", "NoError")]:
            await r.call(
                call.StatusNotification(
                    connector_id=connector,
                    error_code=error,
                    status=status,
                    timestamp=now_iso(),
                    info="e2e" if status == "Faulted" else None,
                    vendor_error_code="E42" if status == "Faulted" else None,
                )
            )

        auth = await r.call(call.Authorize(id_tag=args.id_tag))
        expect(auth.id_tag_info["status"] == "Accepted", f"Authorize {args.id_tag}: {auth.id_tag_info}")
        if args.blocked_tag:
            blocked = await r.call(call.Authorize(id_tag=args.blocked_tag))
            expect(blocked.id_tag_info["status"] == "Blocked", f"Authorize {args.blocked_tag}: {blocked.id_tag_info}")

        await r.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Preparing", timestamp=now_iso()))
        start = await r.call(call.StartTransaction(connector_id=1, id_tag=args.id_tag, meter_start=1000, timestamp=now_iso()))
        tx = start.transaction_id
        expect(isinstance(tx, int) and tx > 0, f"transactionId {tx}")
        expect(start.id_tag_info["status"] == "Accepted", f"StartTransaction idTagInfo {start.id_tag_info}")
        await r.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Charging", timestamp=now_iso()))

        for i, wh in enumerate([1500, 2250]):
            await r.call(
                call.MeterValues(
                    connector_id=1,
                    transaction_id=tx,
                    meter_value=[
                        {
                            "timestamp": now_iso(),
                            "sampledValue": [
                                {"value": str(wh), "measurand": "Energy.Active.Import.Register", "unit": "Wh", "context": "Sample.Periodic"},
                                {"value": str(7.2 + i), "measurand": "Power.Active.Import", "unit": "kW"},
                            ],
                        }
                    ],
                )
            )

        stop = await r.call(
            call.StopTransaction(
                meter_stop=3000,
                timestamp=now_iso(),
                transaction_id=tx,
                reason="Local",
                id_tag=args.id_tag,
                transaction_data=[
                    {"timestamp": now_iso(), "sampledValue": [{"value": "3000", "measurand": "Energy.Active.Import.Register", "unit": "Wh", "context": "Transaction.End"}]}
                ],
            )
        )
        if stop.id_tag_info is not None:
            expect(stop.id_tag_info["status"] == "Accepted", f"StopTransaction idTagInfo {stop.id_tag_info}")
        await r.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Available", timestamp=now_iso()))

        dtr = await r.call(call.DataTransfer(vendor_id="com.example.e2e", message_id="ping", data="hello"))
        expect(dtr.status in ("Accepted", "Rejected", "UnknownMessageId", "UnknownVendorId"), f"DataTransfer {dtr.status}")

        await r.call(call.DiagnosticsStatusNotification(status="Uploaded"))
        await r.call(call.FirmwareStatusNotification(status="Installed"))
        # Security extension (OCPP 1.6 security whitepaper) messages.
        await r.call(call.SecurityEventNotification(type="SettingSystemTime", timestamp=now_iso(), tech_info="e2e"))
        await r.call(call.LogStatusNotification(status="Uploaded", request_id=7))
        sign = await r.call(call.SignCertificate(csr=make_csr(args.station)))
        expect(sign.status in ("Accepted", "Rejected"), f"SignCertificate {sign.status}")

        hb2 = await r.call(call.Heartbeat())
        parse_time(hb2.current_time)
    finally:
        reader.cancel()
        await ws.close()
    return {"station": args.station, "version": "1.6", "transaction_id": tx, "sent": r.sent}


if __name__ == "__main__":
    run(main)
