//! Cron schedules: five fields, UTC, minute resolution.
//!
//! `minute hour day-of-month month day-of-week`, each `*`, a value, a range
//! `a-b`, a step `*/n` or `a-b/n` (or `a/n`: from `a` to the field's end), or
//! a comma list of those. Months and weekdays also by name (`JAN`, `MON`,
//! case-insensitive); weekday 0 and 7 are both Sunday. In the day-of-month
//! field `L` is the last day of the month and `L-n` the n-th day before it
//! (`L-1`: the day before the last), so "the last day of every month" is
//! `0 20 L * *`. Aliases: `@hourly`, `@daily` (`@midnight`), `@weekly`,
//! `@monthly`, `@yearly` (`@annually`).
//!
//! Day matching follows vixie cron (and POSIX): when both day-of-month and
//! day-of-week are restricted (neither starts with `*`), a day matches if
//! *either* does (`0 0 1 * MON`: the 1st and every Monday); otherwise both
//! must, which with one of them `*` means the other alone.
//!
//! Own code rather than a crate: the `L` of the day-of-month field is what
//! the monthly report needs, and the cron crates of this dependency set
//! either lack it or use six/seven-field, seconds-first syntax.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};

/// A schedule that cannot be parsed; says which field and which token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "cron schedule {0:?}: expected 5 fields (minute hour day-of-month month day-of-week) \
         or @hourly/@daily/@weekly/@monthly/@yearly, found {1}"
    )]
    FieldCount(String, usize),
    #[error(
        "cron schedule {0:?}: unknown alias (use @hourly, @daily, @weekly, @monthly or @yearly)"
    )]
    Alias(String),
    #[error("cron schedule {schedule:?}, {field} field: bad token {token:?}: {reason}")]
    Token {
        schedule: String,
        field: &'static str,
        token: String,
        reason: String,
    },
    #[error(
        "cron schedule {0:?} never fires: no selected day of the month exists in the selected months"
    )]
    Never(String),
}

/// A parsed schedule. [`Schedule::next_after`] gives its occurrences.
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    source: String,
    /// Bit n: minute n.
    minutes: u64,
    /// Bit n: hour n.
    hours: u32,
    /// Bit n: day n of the month (1..=31).
    days: u32,
    /// Bit n: `L-n` (0: the last day).
    from_last: u32,
    /// Bit n: month n (1..=12).
    months: u16,
    /// Bit n: weekday n (0 = Sunday ..= 6).
    weekdays: u8,
    /// The day-of-month field starts with `*` (unrestricted, vixie rule).
    days_star: bool,
    /// The day-of-week field starts with `*`.
    weekdays_star: bool,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.source)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Schedule {
    type Err = CronError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Schedule::parse(s)
    }
}

impl TryFrom<String> for Schedule {
    type Error = CronError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Schedule::parse(&s)
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Schedule::parse(&s).map_err(serde::de::Error::custom)
    }
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// One field's rules.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The value names start at (1 for months, 0 for weekdays).
    names_from: u32,
    /// Whether `L` / `L-n` is allowed (day-of-month).
    last: bool,
}

const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
    last: false,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    names_from: 0,
    last: false,
};
const DAY: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    names_from: 0,
    last: true,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &MONTHS,
    names_from: 1,
    last: false,
};
const WEEKDAY: Field = Field {
    name: "day-of-week",
    min: 0,
    // 7 is Sunday too; folded into 0 after parsing.
    max: 7,
    names: &WEEKDAYS,
    names_from: 0,
    last: false,
};

/// A field's selection: values as bits, and `L-n` offsets as bits.
struct Parsed {
    values: u64,
    from_last: u32,
}

impl Field {
    fn value(&self, tok: &str, err: &dyn Fn(String) -> CronError) -> Result<u32, CronError> {
        if let Some(i) = self.names.iter().position(|n| n.eq_ignore_ascii_case(tok)) {
            return Ok(i as u32 + self.names_from);
        }
        let v: u32 = tok.parse().map_err(|_| {
            err(if self.names.is_empty() {
                format!("not a number ({}-{})", self.min, self.max)
            } else {
                format!(
                    "not a number ({}-{}) or a name ({})",
                    self.min,
                    self.max,
                    self.names.join(", ")
                )
            })
        })?;
        if v < self.min || v > self.max {
            return Err(err(format!("out of range {}-{}", self.min, self.max)));
        }
        Ok(v)
    }

    fn parse(&self, schedule: &str, text: &str) -> Result<Parsed, CronError> {
        let mut parsed = Parsed {
            values: 0,
            from_last: 0,
        };
        for part in text.split(',') {
            let err = |reason: String| CronError::Token {
                schedule: schedule.to_string(),
                field: self.name,
                token: part.to_string(),
                reason,
            };
            if part.is_empty() {
                return Err(err("empty list element".into()));
            }
            if self.last && part.as_bytes()[0].eq_ignore_ascii_case(&b'L') {
                let offset = match &part[1..] {
                    "" => 0,
                    rest => match rest.strip_prefix('-').map(str::parse::<u32>) {
                        Some(Ok(n)) if n <= 30 => n,
                        _ => return Err(err("expected L or L-n with n from 0 to 30".into())),
                    },
                };
                parsed.from_last |= 1 << offset;
                continue;
            }
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s
                        .parse()
                        .map_err(|_| err(format!("step {s:?} is not a number")))?;
                    if step == 0 || step > self.max {
                        return Err(err(format!("step must be 1-{}", self.max)));
                    }
                    (r, step)
                }
                None => (part, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a, &err)?, self.value(b, &err)?);
                if a > b {
                    return Err(err(format!("range start {a} is after its end {b}")));
                }
                (a, b)
            } else {
                let a = self.value(range, &err)?;
                // `a/n` runs from a to the end of the field.
                (a, if part.contains('/') { self.max } else { a })
            };
            let mut v = lo;
            while v <= hi {
                parsed.values |= 1 << v;
                v += step;
            }
        }
        Ok(parsed)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day())
}

/// How far [`Schedule::next_after`] looks: long enough for a 29 February
/// behind a non-leap century year (2096 → 2104).
const SEARCH_DAYS: i64 = 366 * 9;

impl Schedule {
    /// Parses a five-field expression or an alias (see the module docs).
    pub fn parse(text: &str) -> Result<Schedule, CronError> {
        let trimmed = text.trim();
        let expanded = if trimmed.starts_with('@') {
            match trimmed.to_ascii_lowercase().as_str() {
                "@hourly" => "0 * * * *",
                "@daily" | "@midnight" => "0 0 * * *",
                "@weekly" => "0 0 * * 0",
                "@monthly" => "0 0 1 * *",
                "@yearly" | "@annually" => "0 0 1 1 *",
                _ => return Err(CronError::Alias(trimmed.to_string())),
            }
        } else {
            trimmed
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(CronError::FieldCount(trimmed.to_string(), fields.len()));
        }
        let minutes = MINUTE.parse(trimmed, fields[0])?.values;
        let hours = HOUR.parse(trimmed, fields[1])?.values as u32;
        let day = DAY.parse(trimmed, fields[2])?;
        let months = MONTH.parse(trimmed, fields[3])?.values as u16;
        let mut weekdays = WEEKDAY.parse(trimmed, fields[4])?.values;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        let schedule = Schedule {
            source: trimmed.to_string(),
            minutes,
            hours,
            days: day.values as u32,
            from_last: day.from_last,
            months,
            weekdays: weekdays as u8,
            days_star: fields[2].starts_with('*'),
            weekdays_star: fields[4].starts_with('*'),
        };
        // Only the day-of-month alone can select nothing (`30 2`): a
        // weekday or an `L` exists in every month.
        if schedule.weekdays_star && schedule.from_last == 0 {
            let possible = (1..=12u32)
                .filter(|m| schedule.months & (1 << m) != 0)
                .any(|m| {
                    let longest = if m == 2 { 29 } else { days_in_month(2001, m) };
                    (1..=longest).any(|d| schedule.days & (1 << d) != 0)
                });
            if !possible {
                return Err(CronError::Never(trimmed.to_string()));
            }
        }
        Ok(schedule)
    }

    /// The text it was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let dom = {
            let last = days_in_month(date.year(), date.month());
            let by_number = self.days & (1 << date.day()) != 0;
            let offset = last - date.day();
            by_number || (offset <= 30 && self.from_last & (1 << offset) != 0)
        };
        let dow = self.weekdays & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.days_star || self.weekdays_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first matching minute of `date` at or after `from` (a time of day).
    fn first_time(&self, from: NaiveTime) -> Option<NaiveTime> {
        for h in from.hour()..24 {
            if self.hours & (1 << h) == 0 {
                continue;
            }
            let start = if h == from.hour() { from.minute() } else { 0 };
            if let Some(m) = (start..60).find(|m| self.minutes & (1 << m) != 0) {
                return NaiveTime::from_hms_opt(h, m, 0);
            }
        }
        None
    }

    /// The first occurrence strictly after `t`; `None` only if none exists
    /// within nine years (a schedule that cannot fire is refused by
    /// [`Schedule::parse`]).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = t
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(Duration::minutes(1))?;
        let mut date = start.date_naive();
        let mut from = start.time();
        for _ in 0..SEARCH_DAYS {
            if self.day_matches(date)
                && let Some(time) = self.first_time(from)
            {
                return Some(Utc.from_utc_datetime(&date.and_time(time)));
            }
            date = date.succ_opt()?;
            from = NaiveTime::MIN;
        }
        None
    }

    /// Occurrences in `(after, upto]`, oldest first, at most `limit` (the
    /// first ones).
    pub fn occurrences(
        &self,
        after: DateTime<Utc>,
        upto: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = after;
        while out.len() < limit {
            match self.next_after(t) {
                Some(n) if n <= upto => {
                    out.push(n);
                    t = n;
                }
                _ => break,
            }
        }
        out
    }

    /// The latest `limit` occurrences in `(after, upto]`, oldest first. Walks
    /// the whole range, so keep it bounded (the scheduler looks back at most
    /// a few weeks).
    pub fn latest_occurrences(
        &self,
        after: DateTime<Utc>,
        upto: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = std::collections::VecDeque::with_capacity(limit.min(64));
        if limit == 0 {
            return Vec::new();
        }
        let mut t = after;
        while let Some(n) = self.next_after(t).filter(|n| *n <= upto) {
            if out.len() == limit {
                out.pop_front();
            }
            out.push_back(n);
            t = n;
        }
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn next(expr: &str, after: &str) -> DateTime<Utc> {
        Schedule::parse(expr).unwrap().next_after(t(after)).unwrap()
    }

    #[test]
    fn last_day_of_february_common_and_leap_years() {
        assert_eq!(
            next("0 20 L * *", "2027-02-01T00:00:00Z"),
            t("2027-02-28T20:00:00Z")
        );
        assert_eq!(
            next("0 20 L * *", "2028-02-01T00:00:00Z"),
            t("2028-02-29T20:00:00Z")
        );
        // The 28th of a leap February is not the last day.
        assert_eq!(
            next("0 20 L * *", "2028-02-28T20:00:00Z"),
            t("2028-02-29T20:00:00Z")
        );
        // L-1: the day before the last.
        assert_eq!(
            next("0 20 L-1 * *", "2028-02-01T00:00:00Z"),
            t("2028-02-28T20:00:00Z")
        );
    }

    #[test]
    fn last_day_of_31_and_30_day_months() {
        let s = Schedule::parse("0 20 L * *").unwrap();
        assert_eq!(
            s.next_after(t("2027-03-30T21:00:00Z")),
            Some(t("2027-03-31T20:00:00Z"))
        );
        assert_eq!(
            s.next_after(t("2027-03-31T20:00:00Z")),
            Some(t("2027-04-30T20:00:00Z")),
            "strictly after"
        );
        assert_eq!(
            s.occurrences(t("2027-01-01T00:00:00Z"), t("2027-12-31T23:59:00Z"), 100)
                .iter()
                .map(|d| d.day())
                .collect::<Vec<_>>(),
            vec![31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        );
    }

    #[test]
    fn steps_ranges_lists_and_names() {
        let s = Schedule::parse("*/15 9-17/4 * JAN,mar-APR/1 MON-FRI").unwrap();
        // 2027-01-01 is a Friday.
        let got = s.occurrences(t("2027-01-01T00:00:00Z"), t("2027-01-01T23:59:00Z"), 100);
        let hm: Vec<_> = got.iter().map(|d| (d.hour(), d.minute())).collect();
        let mut want = Vec::new();
        for h in [9, 13, 17] {
            for m in [0, 15, 30, 45] {
                want.push((h, m));
            }
        }
        assert_eq!(hm, want);
        // Saturday and Sunday skipped; February not selected.
        assert_eq!(
            s.next_after(t("2027-01-29T17:45:00Z")),
            Some(t("2027-03-01T09:00:00Z"))
        );
        assert_eq!(
            next("5/20 * * * *", "2027-01-01T00:00:00Z"),
            t("2027-01-01T00:05:00Z")
        );
        assert_eq!(
            next("5/20 * * * *", "2027-01-01T00:45:00Z"),
            t("2027-01-01T01:05:00Z")
        );
        // Sunday as 0 and as 7.
        assert_eq!(
            next("0 0 * * 7", "2027-01-01T00:00:00Z"),
            t("2027-01-03T00:00:00Z")
        );
        assert_eq!(
            next("0 0 * * 0", "2027-01-01T00:00:00Z"),
            t("2027-01-03T00:00:00Z")
        );
        assert_eq!(
            next("0 0 * * sun", "2027-01-01T00:00:00Z"),
            t("2027-01-03T00:00:00Z")
        );
    }

    #[test]
    fn both_day_fields_restricted_means_either() {
        // The 1st of the month OR any Monday.
        let s = Schedule::parse("0 0 1 * MON").unwrap();
        let got = s.occurrences(t("2027-02-01T00:00:00Z"), t("2027-03-31T00:00:00Z"), 100);
        let days: Vec<_> = got.iter().map(|d| (d.month(), d.day())).collect();
        assert_eq!(
            days,
            vec![
                (2, 8),
                (2, 15),
                (2, 22),
                (3, 1),
                (3, 8),
                (3, 15),
                (3, 22),
                (3, 29)
            ]
        );
        // A starred step in day-of-month leaves day-of-week alone in charge.
        let s = Schedule::parse("0 0 */1 * MON").unwrap();
        assert_eq!(
            s.next_after(t("2027-02-01T00:00:00Z")),
            Some(t("2027-02-08T00:00:00Z"))
        );
        // L or a weekday.
        let s = Schedule::parse("0 0 L * SAT").unwrap();
        assert_eq!(
            s.next_after(t("2027-02-21T00:00:00Z")),
            Some(t("2027-02-27T00:00:00Z"))
        );
        assert_eq!(
            s.next_after(t("2027-02-27T00:00:00Z")),
            Some(t("2027-02-28T00:00:00Z"))
        );
    }

    #[test]
    fn year_rollover_and_rare_dates() {
        assert_eq!(
            next("59 23 31 12 *", "2027-12-31T23:59:00Z"),
            t("2028-12-31T23:59:00Z")
        );
        assert_eq!(
            next("0 0 * * *", "2027-12-31T23:59:30Z"),
            t("2028-01-01T00:00:00Z")
        );
        assert_eq!(
            next("0 0 29 2 *", "2028-03-01T00:00:00Z"),
            t("2032-02-29T00:00:00Z")
        );
        // 2100 is not a leap year.
        assert_eq!(
            next("0 0 29 2 *", "2096-03-01T00:00:00Z"),
            t("2104-02-29T00:00:00Z")
        );
    }

    #[test]
    fn aliases_and_occurrence_windows() {
        assert_eq!(
            next("@daily", "2027-05-05T10:00:00Z"),
            t("2027-05-06T00:00:00Z")
        );
        assert_eq!(
            next("@hourly", "2027-05-05T10:00:00Z"),
            t("2027-05-05T11:00:00Z")
        );
        assert_eq!(
            next("@weekly", "2027-05-05T10:00:00Z"),
            t("2027-05-09T00:00:00Z")
        );
        assert_eq!(
            next("@monthly", "2027-05-05T10:00:00Z"),
            t("2027-06-01T00:00:00Z")
        );
        assert_eq!(
            next("@yearly", "2027-05-05T10:00:00Z"),
            t("2028-01-01T00:00:00Z")
        );
        let s = Schedule::parse("@hourly").unwrap();
        let (a, b) = (t("2027-05-05T00:00:00Z"), t("2027-05-05T10:00:00Z"));
        assert_eq!(
            s.occurrences(a, b, 100).len(),
            10,
            "(a, b]: 01:00 ..= 10:00"
        );
        assert_eq!(
            s.occurrences(a, b, 3).last(),
            Some(&t("2027-05-05T03:00:00Z"))
        );
        assert_eq!(
            s.latest_occurrences(a, b, 2),
            vec![t("2027-05-05T09:00:00Z"), t("2027-05-05T10:00:00Z")]
        );
        assert!(s.latest_occurrences(b, b, 2).is_empty());
    }

    #[test]
    fn errors_name_the_field_and_token() {
        let e = Schedule::parse("0 25 * * *").unwrap_err().to_string();
        assert!(
            e.contains("hour") && e.contains("\"25\"") && e.contains("0-23"),
            "{e}"
        );
        let e = Schedule::parse("0 0 * FOO *").unwrap_err().to_string();
        assert!(
            e.contains("month") && e.contains("\"FOO\"") && e.contains("JAN"),
            "{e}"
        );
        let e = Schedule::parse("*/0 0 * * *").unwrap_err().to_string();
        assert!(e.contains("minute") && e.contains("step"), "{e}");
        let e = Schedule::parse("0 0 5-1 * *").unwrap_err().to_string();
        assert!(e.contains("day-of-month") && e.contains("5-1"), "{e}");
        let e = Schedule::parse("0 0 L-40 * *").unwrap_err().to_string();
        assert!(e.contains("day-of-month") && e.contains("L-40"), "{e}");
        let e = Schedule::parse("0 0 * * L").unwrap_err().to_string();
        assert!(e.contains("day-of-week"), "{e}");
        let e = Schedule::parse("0 0 1,,2 * *").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert!(matches!(
            Schedule::parse("0 0 * *"),
            Err(CronError::FieldCount(_, 4))
        ));
        assert!(matches!(
            Schedule::parse("@often"),
            Err(CronError::Alias(_))
        ));
        assert!(matches!(
            Schedule::parse("0 0 30 2 *"),
            Err(CronError::Never(_))
        ));
        // With a weekday, the day-of-month alone need not exist (OR).
        assert!(Schedule::parse("0 0 30 2 MON").is_ok());
        assert!(Schedule::parse("0 0 29 2 *").is_ok());
    }
}
