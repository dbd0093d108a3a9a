//! Which CALLs each station got a CALLRESULT for, written out so a benchmark
//! can check afterwards that every acknowledged message reached bronze (the
//! CSMS answers a CALL only once it is durable).
//!
//! A station numbers its CALLs 1, 2, 3, ... for its whole life, across
//! reconnects, so its record is the last id it used and the few ids that got
//! no CALLRESULT (a CALLERROR, a timeout, or a socket lost mid-CALL); every
//! other id up to the last was acknowledged.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// One station's acknowledgement record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationAcks {
    pub station: String,
    /// The last message id the station sent (0: none).
    pub last_id: u64,
    /// Ids up to `last_id` without a CALLRESULT, ascending.
    pub unacked: Vec<u64>,
}

impl StationAcks {
    /// The acknowledged message ids.
    pub fn acknowledged(&self) -> impl Iterator<Item = u64> + '_ {
        (1..=self.last_id).filter(|id| self.unacked.binary_search(id).is_err())
    }

    /// `STATION LAST_ID UNACKED,UNACKED` (`-` when every CALL was answered).
    fn line(&self) -> String {
        let mut s = format!("{} {} ", self.station, self.last_id);
        if self.unacked.is_empty() {
            s.push('-');
        }
        for (i, id) in self.unacked.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{id}");
        }
        s
    }

    /// Parses a line written by [`write`].
    pub fn parse(line: &str) -> Option<StationAcks> {
        let mut parts = line.split(' ');
        let station = parts.next()?.to_string();
        let last_id = parts.next()?.parse().ok()?;
        let unacked = match parts.next()? {
            "-" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(StationAcks {
            station,
            last_id,
            unacked,
        })
    }
}

/// The file a process writes: `base` itself for a single process, `base.N`
/// for worker N of a multi-process run.
pub fn path_for(base: &Path, worker: Option<usize>) -> PathBuf {
    match worker {
        None => base.to_path_buf(),
        Some(w) => {
            let mut name = base.as_os_str().to_owned();
            name.push(format!(".{w}"));
            PathBuf::from(name)
        }
    }
}

/// Writes one line per station.
pub fn write(path: &Path, acks: &[StationAcks]) -> io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for a in acks {
        writeln!(out, "{}", a.line())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_list_the_acknowledged_ids() {
        let a = StationAcks {
            station: "LG000001".into(),
            last_id: 6,
            unacked: vec![2, 5],
        };
        assert_eq!(a.line(), "LG000001 6 2,5");
        assert_eq!(StationAcks::parse(&a.line()), Some(a.clone()));
        assert_eq!(a.acknowledged().collect::<Vec<_>>(), vec![1, 3, 4, 6]);
        let all = StationAcks {
            station: "LG000002".into(),
            last_id: 2,
            unacked: vec![],
        };
        assert_eq!(all.line(), "LG000002 2 -");
        assert_eq!(StationAcks::parse("LG000002 2 -"), Some(all));
        assert_eq!(StationAcks::parse("LG000002 x -"), None);
    }

    #[test]
    fn worker_files_get_a_suffix() {
        let base = Path::new("/tmp/acks.txt");
        assert_eq!(path_for(base, None), base);
        assert_eq!(path_for(base, Some(3)), Path::new("/tmp/acks.txt.3"));
    }

    #[test]
    fn writes_one_line_per_station() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let acks = vec![
            StationAcks {
                station: "A".into(),
                last_id: 3,
                unacked: vec![3],
            },
            StationAcks {
                station: "B".into(),
                last_id: 0,
                unacked: vec![],
            },
        ];
        write(&path, &acks).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<_> = text.lines().filter_map(StationAcks::parse).collect();
        assert_eq!(back, acks);
    }
}
