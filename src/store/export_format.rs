//! The export file: JSON Lines, one object a line, each with its `kind`.
//!
//! ```text
//! {"kind":"header","format":"tollgate-export","version":1,"store_format":5,"batch":812,"exported_at_us":...}
//! {"kind":"scope","scope":"subject","id":"alice","state":{...}}
//! {"kind":"reservation","id":"0192a8a4-...","record":{...}}
//! {"kind":"assignment","subject":"alice","config":{...}}
//! {"kind":"end","records":3,"scopes":1,"reservations":1,"assignments":1,"checksum":"..."}
//! ```
//!
//! Why JSON Lines: an operator can read, grep and diff a backup with everyday tools, and a
//! record is a line, so a file is written and read as a stream, never whole in memory. The
//! fields of `state`, `record` and `config` are those of the store's records of `store_format`
//! (serde's names), so a build reads only exports of its own store format. The end line
//! carries the counts and an xxh3-64 checksum of every byte before it: an export cut short, or
//! edited without care, is refused whole. (A checksum detects damage; it is not a signature.)

use std::net::IpAddr;
use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::records::Record;
use crate::engine::{Reservation, ReservationId, ScopeKey, ScopeState};
use crate::policy::SubjectConfig;

/// The header's `format`.
pub const FORMAT_NAME: &str = "tollgate-export";
/// The version of the file's layout (header, record lines, end line).
pub const VERSION: u32 = 1;
/// The longest line an import reads (a record is a few KB at most).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// One line of an export. Written through serde's internally tagged enum (`kind` first);
/// read by [`Line::parse`], since serde reads an internally tagged enum through a buffer that
/// cannot hold the records' 128-bit numbers (a reservation id, a bucket's level).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// The first line.
    Header(Header),
    /// A scope's state.
    Scope(ScopeLine),
    /// A reservation.
    Reservation(ReservationLine),
    /// A subject's assignment.
    Assignment(AssignmentLine),
    /// The last line.
    End(End),
}

/// What the file is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The line's `kind`, written by [`Line`]'s tag and read by [`Line::parse`].
    #[serde(rename = "kind", default, skip_serializing)]
    pub tag: IgnoredAny,
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The format of the records ([`super::RECORD_FORMAT`]).
    pub store_format: u32,
    /// The store's batch the export is as of (none: a store written before tallies).
    pub batch: Option<u64>,
    /// When the export began, in microseconds since the Unix epoch.
    pub exported_at_us: u64,
}

/// A scope's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeLine {
    /// The line's `kind`, written by [`Line`]'s tag and read by [`Line::parse`].
    #[serde(rename = "kind", default, skip_serializing)]
    pub tag: IgnoredAny,
    /// `subject`, `group`, `ip` or `global`.
    pub scope: String,
    /// The subject, the group, the IP address; empty for the fleet.
    pub id: String,
    /// The state.
    pub state: ScopeState,
}

/// A reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationLine {
    /// The line's `kind`, written by [`Line`]'s tag and read by [`Line::parse`].
    #[serde(rename = "kind", default, skip_serializing)]
    pub tag: IgnoredAny,
    /// The reservation id, as Reserve returned it (the record's `id` is the same, as a number).
    pub id: String,
    /// The record.
    pub record: Reservation,
    /// The caller that made it (`[callers]`), if one did. Beside the record, as the record
    /// keeps it beside its other fields (`records.rs`); absent when none, so an export of a
    /// ledger without callers reads as it did before callers existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
}

/// A subject's tier, group and overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentLine {
    /// The line's `kind`, written by [`Line`]'s tag and read by [`Line::parse`].
    #[serde(rename = "kind", default, skip_serializing)]
    pub tag: IgnoredAny,
    /// The subject.
    pub subject: String,
    /// What was set.
    pub config: SubjectConfig,
}

/// The counts of an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every record.
    pub records: u64,
    /// Scope records.
    pub scopes: u64,
    /// Reservation records.
    pub reservations: u64,
    /// Assignment records.
    pub assignments: u64,
}

impl Counts {
    /// Count `record` in.
    pub fn add(&mut self, record: &Record) {
        self.records += 1;
        match record {
            Record::Scope(..) => self.scopes += 1,
            Record::Reservation(_) => self.reservations += 1,
            Record::Assignment(..) => self.assignments += 1,
        }
    }
}

/// The last line: what the file holds, and a checksum of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct End {
    /// The line's `kind`, written by [`Line`]'s tag and read by [`Line::parse`].
    #[serde(rename = "kind", default, skip_serializing)]
    pub tag: IgnoredAny,
    /// Every record.
    pub records: u64,
    /// Scope records.
    pub scopes: u64,
    /// Reservation records.
    pub reservations: u64,
    /// Assignment records.
    pub assignments: u64,
    /// xxh3-64 of every byte before this line, as 16 hex digits.
    pub checksum: String,
}

impl End {
    /// The end line of a file holding `counts`, whose bytes before it hash to `sum`.
    pub fn new(counts: Counts, sum: u64) -> Self {
        Self {
            tag: IgnoredAny,
            records: counts.records,
            scopes: counts.scopes,
            reservations: counts.reservations,
            assignments: counts.assignments,
            checksum: format!("{sum:016x}"),
        }
    }

    /// The counts it states.
    pub fn counts(&self) -> Counts {
        Counts {
            records: self.records,
            scopes: self.scopes,
            reservations: self.reservations,
            assignments: self.assignments,
        }
    }
}

impl Header {
    /// The header of an export of this build, as of `batch`.
    pub fn new(batch: Option<u64>, exported_at_us: u64) -> Self {
        Self {
            tag: IgnoredAny,
            format: FORMAT_NAME.into(),
            version: VERSION,
            store_format: super::RECORD_FORMAT,
            batch,
            exported_at_us,
        }
    }

    /// Why this build cannot read the file, if it cannot.
    pub fn refusal(&self) -> Option<String> {
        if self.format != FORMAT_NAME {
            return Some(format!(
                "format is {:?}, not {FORMAT_NAME:?}: not a tollgate export",
                self.format
            ));
        }
        if self.version != VERSION {
            return Some(format!(
                "export version {} (this build reads version {VERSION})",
                self.version
            ));
        }
        if self.store_format != super::RECORD_FORMAT {
            return Some(format!(
                "records of store format {} (this build reads store format {})",
                self.store_format,
                super::RECORD_FORMAT
            ));
        }
        None
    }
}

impl From<Record> for Line {
    fn from(record: Record) -> Self {
        match record {
            Record::Scope(key, state) => {
                let (scope, id) = match key {
                    ScopeKey::Subject(s) => ("subject", s.to_string()),
                    ScopeKey::Group(g) => ("group", g.to_string()),
                    ScopeKey::Ip(ip) => ("ip", ip.to_string()),
                    ScopeKey::Global => ("global", String::new()),
                };
                Line::Scope(ScopeLine {
                    tag: IgnoredAny,
                    scope: scope.into(),
                    id,
                    state,
                })
            }
            Record::Reservation(r) => Line::Reservation(ReservationLine {
                tag: IgnoredAny,
                id: r.id.to_string(),
                caller: r.caller.clone(),
                record: *r,
            }),
            Record::Assignment(subject, config) => Line::Assignment(AssignmentLine {
                tag: IgnoredAny,
                subject,
                config,
            }),
        }
    }
}

/// The `kind` of a line, read first.
#[derive(Deserialize)]
struct Kind {
    kind: String,
}

impl Line {
    /// Read one line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        use serde::de::Error;
        Ok(match serde_json::from_slice::<Kind>(line)?.kind.as_str() {
            "header" => Line::Header(serde_json::from_slice(line)?),
            "scope" => Line::Scope(serde_json::from_slice(line)?),
            "reservation" => Line::Reservation(serde_json::from_slice(line)?),
            "assignment" => Line::Assignment(serde_json::from_slice(line)?),
            "end" => Line::End(serde_json::from_slice(line)?),
            other => {
                return Err(serde_json::Error::custom(format!(
                    "unknown kind {other:?} (header, scope, reservation, assignment or end)"
                )))
            }
        })
    }

    /// The record a record line holds; why not, for a header or end line or a line whose
    /// fields disagree.
    pub fn into_record(self) -> Result<Record, String> {
        match self {
            Line::Scope(s) => {
                let key =
                    match s.scope.as_str() {
                        "subject" => ScopeKey::Subject(Arc::from(s.id)),
                        "group" => ScopeKey::Group(Arc::from(s.id)),
                        "ip" => ScopeKey::Ip(s.id.parse::<IpAddr>().map_err(|e| {
                            format!("scope id {:?} is not an IP address: {e}", s.id)
                        })?),
                        "global" if s.id.is_empty() => ScopeKey::Global,
                        "global" => return Err("the global scope has an empty id".into()),
                        other => {
                            return Err(format!(
                                "scope {other:?} is not subject, group, ip or global"
                            ))
                        }
                    };
                Ok(Record::Scope(key, s.state))
            }
            Line::Reservation(r) => {
                let id: ReservationId =
                    r.id.parse()
                        .map_err(|_| format!("reservation id {:?} is not a UUID", r.id))?;
                if id != r.record.id {
                    return Err(format!(
                        "reservation id {} differs from its record's id {}",
                        r.id, r.record.id
                    ));
                }
                let mut record = r.record;
                record.caller = r.caller;
                Ok(Record::Reservation(Box::new(record)))
            }
            Line::Assignment(a) => Ok(Record::Assignment(a.subject, a.config)),
            Line::Header(_) => Err("a header after the first line".into()),
            Line::End(_) => Err("an end line before the end".into()),
        }
    }
}
