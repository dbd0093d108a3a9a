//! Golden tests of billing: 1.6 sessions through the whole pipeline, priced
//! with a tariff file, compared with answers computed by hand (comments).

use std::path::Path;

use schemas::tables::{GOLD_BILLING, GOLD_BILLING_STATEMENTS};

use crate::golden_tests::{Msg, append_bronze, call, rows, table, version_of};
use crate::{PipelineConfig, RunOptions, run};

/// std-1 from Jan 1: 0.30/kWh, 0.20 at night (22:00–06:00 UTC); from
/// Mar 15 std-2: `{BASE2}`/kWh, 0.25 at night. Token FLEET: 0.25/kWh plus
/// 0.10 per minute.
const TARIFFS: &str = r#"
[[tariff]]
id = "std-1"
currency = "EUR"
valid_from = "2025-01-01"
energy_price_per_kwh = 0.30
[[tariff.windows]]
start = "22:00"
end = "06:00"
energy_price_per_kwh = 0.20

[[tariff]]
id = "std-2"
currency = "EUR"
valid_from = "2025-03-15"
energy_price_per_kwh = {BASE2}
[[tariff.windows]]
start = "22:00"
end = "06:00"
energy_price_per_kwh = 0.25

[[tariff]]
id = "fleet"
currency = "EUR"
valid_from = "2025-01-01"
energy_price_per_kwh = 0.25
per_minute_fee = 0.10
id_tokens = ["FLEET"]
"#;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A 1.6 session on station N: start (and the CSMS's answer assigning
/// `tx`), MeterValues samples `(time, Wh)`, stop. Times are `YYYY-MM-DDTHH:MM`.
fn session(
    tx: i64,
    tag: &str,
    start: &str,
    stop: &str,
    meter: (i64, i64),
    samples: &[(&str, i64)],
) -> Vec<Msg> {
    let ts = |t: &str| leak(format!("{t}:00Z"));
    let mut out = vec![call(
        ts(start),
        "N",
        "1.6",
        &format!("s{tx}"),
        "StartTransaction",
        format!(
            r#"{{"connectorId":1,"idTag":"{tag}","meterStart":{},"timestamp":"{}"}}"#,
            meter.0,
            ts(start)
        ),
    )];
    let mut answer = call(
        ts(start),
        "N",
        "1.6",
        &format!("s{tx}"),
        "StartTransaction",
        format!(r#"{{"idTagInfo":{{"status":"Accepted"}},"transactionId":{tx}}}"#),
    );
    answer.direction = "csms_to_cs";
    answer.message_type = 3;
    out.push(answer);
    for (i, (t, wh)) in samples.iter().enumerate() {
        out.push(call(
            ts(t),
            "N",
            "1.6",
            &format!("m{tx}-{i}"),
            "MeterValues",
            format!(
                r#"{{"connectorId":1,"transactionId":{tx},"meterValue":[{{"timestamp":"{}","sampledValue":[{{"value":"{wh}"}}]}}]}}"#,
                ts(t)
            ),
        ));
    }
    out.push(call(
        ts(stop),
        "N",
        "1.6",
        &format!("p{tx}"),
        "StopTransaction",
        format!(
            r#"{{"transactionId":{tx},"idTag":"{tag}","meterStop":{},"timestamp":"{}","reason":"Local"}}"#,
            meter.1,
            ts(stop)
        ),
    ));
    out
}

fn history() -> Vec<Msg> {
    let mut m = Vec::new();
    // 1: the night-rate split. 21:00–23:00, 1 kWh per 30 min (samples every
    // 30 min): 2 kWh before 22:00 at 0.30 = 0.60, 2 after at 0.20 = 0.40.
    m.extend(session(
        1,
        "TAG1",
        "2025-03-10T21:00",
        "2025-03-10T23:00",
        (0, 4000),
        &[
            ("2025-03-10T21:30", 1000),
            ("2025-03-10T22:00", 2000),
            ("2025-03-10T22:30", 3000),
        ],
    ));
    // 2: per-minute fee. FLEET, 45 min × 0.10 = 4.50; 6 kWh × 0.25 = 1.50.
    m.extend(session(
        2,
        "FLEET",
        "2025-03-11T10:00",
        "2025-03-11T10:45",
        (0, 6000),
        &[],
    ));
    // 3 and 4: the tariff change on Mar 15. 10 kWh by day: 3.00 the day
    // before (std-1), 10 × BASE2 on the day (std-2).
    m.extend(session(
        3,
        "TAG1",
        "2025-03-14T12:00",
        "2025-03-14T13:00",
        (0, 10000),
        &[],
    ));
    m.extend(session(
        4,
        "TAG1",
        "2025-03-15T12:00",
        "2025-03-15T13:00",
        (0, 10000),
        &[],
    ));
    // 5: stop below start: flagged, energy priced 0, incomplete.
    m.extend(session(
        5,
        "TAG1",
        "2025-03-15T14:00",
        "2025-03-15T14:30",
        (5000, 4000),
        &[],
    ));
    // 6: across 22:00 with only start/stop readings: split by time (2 + 2
    // kWh), estimated: 2 × BASE2 + 2 × 0.25.
    m.extend(session(
        6,
        "TAG1",
        "2025-03-15T21:00",
        "2025-03-15T23:00",
        (0, 4000),
        &[],
    ));
    // 7: wholly at night in April: 2 kWh × 0.25 = 0.50, nothing to split.
    m.extend(session(
        7,
        "TAG1",
        "2025-04-01T00:30",
        "2025-04-01T01:00",
        (0, 2000),
        &[],
    ));
    m
}

async fn lines(lake: &str) -> Vec<String> {
    rows(
        lake,
        GOLD_BILLING,
        "SELECT date, transaction_id, id_token, duration_min, energy_kwh, energy_kwh_peak,
                energy_kwh_offpeak, energy_cost, time_cost, total_cost, currency, tariff_id,
                energy_split, energy_flag, is_complete_data
         FROM t ORDER BY date, transaction_id",
    )
    .await
}

async fn statements(lake: &str) -> Vec<String> {
    rows(
        lake,
        GOLD_BILLING_STATEMENTS,
        "SELECT month, id_token, currency, transactions, energy_kwh, total_cost
         FROM t ORDER BY month, id_token",
    )
    .await
}

async fn versions(lake: &str) -> (Option<u64>, Option<u64>) {
    (
        version_of(lake, GOLD_BILLING).await,
        version_of(lake, GOLD_BILLING_STATEMENTS).await,
    )
}

fn write_tariffs(path: &Path, base2: &str) {
    std::fs::write(path, TARIFFS.replace("{BASE2}", base2)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_golden_incremental_and_repriced() {
    let tmp = tempfile::tempdir().unwrap();
    let lake = tmp.path().join("lake");
    let lake = lake.to_str().unwrap();
    let tariffs = tmp.path().join("tariffs.toml");
    write_tariffs(&tariffs, "0.40");
    let opts = RunOptions::default();

    // Without a tariff file billing is skipped.
    append_bronze(lake, &history()).await;
    let plain = PipelineConfig {
        memory_limit_bytes: 64 << 20,
        ..PipelineConfig::default()
    };
    let s = run(lake, &plain, &opts, &|_| {}).await.unwrap();
    assert!(s.tables.iter().all(|t| !t.name.contains("billing")), "{s}");
    assert_eq!(versions(lake).await, (None, None));

    let config = PipelineConfig {
        tariffs_path: Some(tariffs.clone()),
        ..plain
    };
    let first = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(table(&first, "gold.billing").rows_out, 7, "{first}");
    assert_eq!(
        lines(lake).await,
        vec![
            "2025-03-10|1|TAG1|120.0|4.0|2.0|2.0|1.0|0.0|1.0|EUR|std-1|metered|∅|true",
            "2025-03-11|2|FLEET|45.0|6.0|6.0|0.0|1.5|4.5|6.0|EUR|fleet|metered|∅|true",
            "2025-03-14|3|TAG1|60.0|10.0|10.0|0.0|3.0|0.0|3.0|EUR|std-1|metered|∅|true",
            // 10 × 0.40
            "2025-03-15|4|TAG1|60.0|10.0|10.0|0.0|4.0|0.0|4.0|EUR|std-2|metered|∅|true",
            "2025-03-15|5|TAG1|30.0|∅|∅|∅|0.0|0.0|0.0|EUR|std-2|unavailable|stop_below_start|false",
            // 2 × 0.40 + 2 × 0.25
            "2025-03-15|6|TAG1|120.0|4.0|2.0|2.0|1.3|0.0|1.3|EUR|std-2|estimated|∅|false",
            "2025-04-01|7|TAG1|30.0|2.0|0.0|2.0|0.5|0.0|0.5|EUR|std-2|metered|∅|true",
        ]
    );
    // March TAG1: 1.0 + 3.0 + 4.0 + 0 + 1.3 = 9.3 over 4 + 10 + 10 + 4 kWh
    // (5's energy is flagged); FLEET: 6.0; April TAG1: 0.5.
    assert_eq!(
        statements(lake).await,
        vec![
            "2025-03|FLEET|EUR|1|6.0|6.0",
            "2025-03|TAG1|EUR|5|28.0|9.3",
            "2025-04|TAG1|EUR|1|2.0|0.5",
        ]
    );

    // A rerun creates no versions.
    let before = versions(lake).await;
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);

    // New sessions on Apr 2 and Apr 3 (1 kWh × 0.40 each): two dates, one
    // month rewritten. (Two dates, not one: with a single changed stop date
    // gold.transactions_completed's query currently fails DataFusion's
    // SanityCheckPlan; see the report of this change.)
    let mut more = session(
        8,
        "TAG1",
        "2025-04-02T10:00",
        "2025-04-02T11:00",
        (0, 1000),
        &[],
    );
    more.extend(session(
        9,
        "TAG1",
        "2025-04-03T10:00",
        "2025-04-03T11:00",
        (0, 1000),
        &[],
    ));
    append_bronze(lake, &more).await;
    let second = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(
        table(&second, "gold.billing").dates_rewritten,
        2,
        "{second}"
    );
    assert_eq!(
        table(&second, "gold.billing_statements").dates_rewritten,
        1,
        "{second}"
    );
    // April TAG1: 0.5 + 0.4 + 0.4 over 2 + 1 + 1 kWh.
    assert_eq!(statements(lake).await[2..], ["2025-04|TAG1|EUR|3|4.0|1.3"]);

    // A changed tariff file reprices every date: std-2 at 0.50 makes 4 cost
    // 5.0, 6 cost 2 × 0.5 + 2 × 0.25 = 1.5, 8 and 9 cost 0.5 (7 is all
    // night).
    write_tariffs(&tariffs, "0.50");
    let third = run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(table(&third, "gold.billing").dates_rewritten, 7, "{third}");
    let after = lines(lake).await;
    assert_eq!(
        after[3],
        "2025-03-15|4|TAG1|60.0|10.0|10.0|0.0|5.0|0.0|5.0|EUR|std-2|metered|∅|true"
    );
    assert_eq!(
        after[5],
        "2025-03-15|6|TAG1|120.0|4.0|2.0|2.0|1.5|0.0|1.5|EUR|std-2|estimated|∅|false"
    );
    // March TAG1: 1.0 + 3.0 + 5.0 + 0 + 1.5 = 10.5; April: 3 × 0.5.
    assert_eq!(
        statements(lake).await,
        vec![
            "2025-03|FLEET|EUR|1|6.0|6.0",
            "2025-03|TAG1|EUR|5|28.0|10.5",
            "2025-04|TAG1|EUR|3|4.0|1.5",
        ]
    );
    let before = versions(lake).await;
    run(lake, &config, &opts, &|_| {}).await.unwrap();
    assert_eq!(versions(lake).await, before);

    // A broken tariff file fails the run with the file, tariff and field.
    std::fs::write(&tariffs, TARIFFS.replace("{BASE2}", "\"cheap\"")).unwrap();
    let e = run(lake, &config, &opts, &|_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tariffs.toml") && e.contains("std-2") && e.contains("energy_price_per_kwh"),
        "{e}"
    );
}
