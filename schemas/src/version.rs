//! The OCPP versions this CSMS speaks and how each is named on the wire and in
//! the lake.

use std::fmt;

/// An OCPP-J protocol version, negotiated through the WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OcppVersion {
    V16,
    V201,
    V21,
}

impl OcppVersion {
    /// Every supported version, newest first: the order in which the server
    /// prefers them when a charger offers several.
    pub const ALL: [OcppVersion; 3] = [OcppVersion::V21, OcppVersion::V201, OcppVersion::V16];

    /// The WebSocket subprotocol token (`Sec-WebSocket-Protocol`).
    pub const fn subprotocol(self) -> &'static str {
        match self {
            OcppVersion::V16 => "ocpp1.6",
            OcppVersion::V201 => "ocpp2.0.1",
            OcppVersion::V21 => "ocpp2.1",
        }
    }

    /// The version as stored in `bronze.ocpp_messages.ocpp_version` and used as
    /// the schema folder name.
    pub const fn as_str(self) -> &'static str {
        match self {
            OcppVersion::V16 => "1.6",
            OcppVersion::V201 => "2.0.1",
            OcppVersion::V21 => "2.1",
        }
    }

    pub fn from_subprotocol(token: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|v| v.subprotocol().eq_ignore_ascii_case(token.trim()))
    }

    /// Parses the lake/config name (`1.6`, `2.0.1`, `2.1`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == name)
    }

    /// Picks the best version among a comma-separated `Sec-WebSocket-Protocol`
    /// header value, honouring only those in `allowed`.
    pub fn negotiate<'a>(
        offered: impl IntoIterator<Item = &'a str>,
        allowed: &[OcppVersion],
    ) -> Option<Self> {
        let offered: Vec<OcppVersion> = offered
            .into_iter()
            .flat_map(|h| h.split(','))
            .filter_map(Self::from_subprotocol)
            .collect();
        Self::ALL
            .into_iter()
            .find(|v| allowed.contains(v) && offered.contains(v))
    }

    /// 2.x numbers start at 2; used where the two families differ.
    pub const fn is_2x(self) -> bool {
        !matches!(self, OcppVersion::V16)
    }

    /// Small stable code used in the WAL record.
    pub const fn code(self) -> u8 {
        match self {
            OcppVersion::V16 => 16,
            OcppVersion::V201 => 201,
            OcppVersion::V21 => 210,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            16 => Some(OcppVersion::V16),
            201 => Some(OcppVersion::V201),
            210 => Some(OcppVersion::V21),
            _ => None,
        }
    }
}

impl fmt::Display for OcppVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_newest_offered_and_allowed() {
        let all = OcppVersion::ALL;
        assert_eq!(
            OcppVersion::negotiate(["ocpp1.6, ocpp2.0.1"], &all),
            Some(OcppVersion::V201)
        );
        assert_eq!(
            OcppVersion::negotiate(["ocpp1.6"], &all),
            Some(OcppVersion::V16)
        );
        assert_eq!(
            OcppVersion::negotiate(["ocpp2.1", "ocpp1.6"], &[OcppVersion::V16]),
            Some(OcppVersion::V16)
        );
        assert_eq!(OcppVersion::negotiate(["ocpp1.5", "mqtt"], &all), None);
        assert_eq!(OcppVersion::negotiate([], &all), None);
    }

    #[test]
    fn codes_round_trip() {
        for v in OcppVersion::ALL {
            assert_eq!(OcppVersion::from_code(v.code()), Some(v));
            assert_eq!(OcppVersion::parse(v.as_str()), Some(v));
        }
    }
}
