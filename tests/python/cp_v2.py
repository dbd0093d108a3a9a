"""OCPP 2.0.1 / 2.1 charge point session shared by cp_v201.py and cp_v21.py:
runs a full session against the CSMS and checks every answer (the `ocpp`
package validates each one against the OCA schemas of the version)."""

import asyncio
import importlib
import uuid

from cp_common import Recorder, connect, expect, make_csr, now_iso, parse_args, parse_time, run


def energy(wh, context):
    return {
        "timestamp": now_iso(),
        "sampledValue": [
            {"value": wh, "measurand": "Energy.Active.Import.Register", "context": context, "unitOfMeasure": {"unit": "Wh"}},
        ],
    }


async def session(version_module, subprotocol, label):
    args = parse_args(__doc__, subprotocol)
    mod = importlib.import_module(f"ocpp.{version_module}")
    call = importlib.import_module(f"ocpp.{version_module}.call")
    ws = await connect(args)
    cp = mod.ChargePoint(args.station, ws, response_timeout=args.timeout)
    reader = asyncio.create_task(cp.start())
    r = Recorder(cp, f"py{label}")
    id_token = {"idToken": args.id_tag, "type": "ISO14443"}
    tx = str(uuid.uuid4())
    try:
        boot = await r.call(
            call.BootNotification(
                charging_station={"model": "E2E-Model", "vendorName": "E2E-Vendor", "serialNumber": f"SN-{label}", "firmwareVersion": "2.3.4"},
                reason="PowerUp",
            )
        )
        expect(boot.status == args.boot_status, f"boot status {boot.status}")
        expect(isinstance(boot.interval, int) and boot.interval > 0, f"boot interval {boot.interval}")
        parse_time(boot.current_time)

        hb = await r.call(call.Heartbeat())
        parse_time(hb.current_time)

        for status in ["Available", "Faulted", "Available"]:
            await r.call(call.StatusNotification(timestamp=now_iso(), connector_status=status, evse_id=1, connector_id=1))

        auth = await r.call(call.Authorize(id_token=id_token))
        expect(auth.id_token_info["status"] == "Accepted", f"Authorize {args.id_tag}: {auth.id_token_info}")
        if args.blocked_tag:
            blocked = await r.call(call.Authorize(id_token={"idToken": args.blocked_tag, "type": "ISO14443"}))
            expect(blocked.id_token_info["status"] == "Blocked", f"Authorize {args.blocked_tag}: {blocked.id_token_info}")

        await r.call(call.StatusNotification(timestamp=now_iso(), connector_status="Occupied", evse_id=1, connector_id=1))
        started = await r.call(
            call.TransactionEvent(
                event_type="Started",
                timestamp=now_iso(),
                trigger_reason="Authorized",
                seq_no=0,
                transaction_info={"transactionId": tx, "chargingState": "Charging"},
                evse={"id": 1, "connectorId": 1},
                id_token=id_token,
                meter_value=[energy(1000, "Transaction.Begin")],
            )
        )
        expect(started.id_token_info is not None, "TransactionEvent Started with idToken: no idTokenInfo")
        expect(started.id_token_info["status"] == "Accepted", f"TransactionEvent Started idTokenInfo {started.id_token_info}")

        for seq, wh in [(1, 1800), (2, 2600)]:
            await r.call(
                call.TransactionEvent(
                    event_type="Updated",
                    timestamp=now_iso(),
                    trigger_reason="MeterValuePeriodic",
                    seq_no=seq,
                    transaction_info={"transactionId": tx, "chargingState": "Charging"},
                    meter_value=[energy(wh, "Sample.Periodic")],
                )
            )
        await r.call(call.MeterValues(evse_id=1, meter_value=[energy(2700, "Sample.Clock")]))
        await r.call(
            call.TransactionEvent(
                event_type="Ended",
                timestamp=now_iso(),
                trigger_reason="StopAuthorized",
                seq_no=3,
                transaction_info={"transactionId": tx, "stoppedReason": "Local"},
                id_token=id_token,
                meter_value=[energy(3000, "Transaction.End")],
            )
        )
        await r.call(call.StatusNotification(timestamp=now_iso(), connector_status="Available", evse_id=1, connector_id=1))

        dtr = await r.call(call.DataTransfer(vendor_id="com.example.e2e", message_id="ping", data="hello"))
        expect(dtr.status in ("Accepted", "Rejected", "UnknownMessageId", "UnknownVendorId"), f"DataTransfer {dtr.status}")

        await r.call(call.SecurityEventNotification(type="SettingSystemTime", timestamp=now_iso(), tech_info="e2e"))
        await r.call(call.FirmwareStatusNotification(status="Installed", request_id=3))
        await r.call(
            call.NotifyEvent(
                generated_at=now_iso(),
                seq_no=0,
                tbc=False,
                event_data=[
                    {
                        "eventId": 1,
                        "timestamp": now_iso(),
                        "trigger": "Delta",
                        "actualValue": "true",
                        "eventNotificationType": "HardWiredNotification",
                        "component": {"name": "Connector", "evse": {"id": 1, "connectorId": 1}},
                        "variable": {"name": "Problem"},
                    }
                ],
            )
        )
        await r.call(
            call.NotifyReport(
                request_id=1,
                generated_at=now_iso(),
                seq_no=0,
                tbc=False,
                report_data=[
                    {
                        "component": {"name": "ChargingStation"},
                        "variable": {"name": "Model"},
                        "variableAttribute": [{"type": "Actual", "value": "E2E-Model", "mutability": "ReadOnly"}],
                        "variableCharacteristics": {"dataType": "string", "supportsMonitoring": False},
                    }
                ],
            )
        )
        sign = await r.call(call.SignCertificate(csr=make_csr(args.station), certificate_type="ChargingStationCertificate"))
        expect(sign.status in ("Accepted", "Rejected"), f"SignCertificate {sign.status}")
        await r.call(call.LogStatusNotification(status="Uploaded", request_id=9))

        hb2 = await r.call(call.Heartbeat())
        parse_time(hb2.current_time)
    finally:
        reader.cancel()
        await ws.close()
    return {"station": args.station, "version": subprotocol.removeprefix("ocpp"), "transaction_id": tx, "sent": r.sent}


def main(version_module, subprotocol, label):
    run(lambda: session(version_module, subprotocol, label))
