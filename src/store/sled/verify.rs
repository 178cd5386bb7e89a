//! The check at start: do sled's records, sled's own tally and the watermark agree?
//!
//! Three witnesses, each written at a different moment:
//! - the records as read (their count and digest, computed by the load that reads them all);
//! - sled's tally record, written in the same atomic batch as the records it describes, so it
//!   always matches them, whatever instant a crash came at;
//! - the watermark, written after the flush that made its batch durable, so it is never ahead
//!   of what sled has on disk: at most behind it, when a crash came between the two.
//!
//! Hence the rules: the records must match sled's tally (else sled lost or altered records
//! inside what it kept), and sled's batch must be at least the watermark's (else sled lost
//! whole batches at its end, tally record included: what truncating or deleting its log does).
//! Sled ahead of the watermark is the crash between flush and mark, and is fine.

use super::watermark::Mark;
use crate::store::{DataLoss, Tally};

/// What was found at start.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// The records read: their count and digest (the batch is not known from them).
    pub found: Tally,
    /// Sled's tally record, if it has one.
    pub stored: Option<Tally>,
    /// The watermark.
    pub mark: Mark,
    /// Whether sled's format record says a format that always has a tally.
    pub has_tally: bool,
}

fn records(t: &Tally) -> String {
    format!("{} records, digest {:016x}", t.records, t.digest)
}

/// A data file gone while the watermark remains.
pub fn data_file_missing(file: &std::path::Path, mark: &Mark) -> DataLoss {
    DataLoss {
        what: format!(
            "sled's data file {} is missing, but the watermark remains",
            file.display()
        ),
        found: "no data file".into(),
        expected: expected(mark),
    }
}

fn expected(mark: &Mark) -> String {
    match mark {
        Mark::Found(w) => w.to_string(),
        Mark::Missing => "no watermark".into(),
        Mark::Unreadable(why) => format!("an unreadable watermark ({why})"),
    }
}

/// Check the evidence; the tally the store is at, if it holds.
pub fn check(e: &Evidence) -> Result<Tally, DataLoss> {
    if let Mark::Unreadable(why) = &e.mark {
        return Err(DataLoss {
            what: format!("the watermark file is damaged: {why}"),
            found: records(&e.found),
            expected: "a readable watermark".into(),
        });
    }
    let Some(stored) = e.stored else {
        return match &e.mark {
            Mark::Found(w) => Err(DataLoss {
                what: "sled has no tally record: its data is gone or was replaced, but the watermark remains".into(),
                found: records(&e.found),
                expected: w.to_string(),
            }),
            _ if e.has_tally => Err(DataLoss {
                what: "sled has no tally record, which this store format always has: it was lost".into(),
                found: records(&e.found),
                expected: "a tally record".into(),
            }),
            // A new directory, or a store written before tallies existed (format 4).
            _ => Ok(e.found),
        };
    };
    if !e.found.same_records(&stored) {
        return Err(DataLoss {
            what: format!(
                "sled's records do not match its own tally of batch {}: records were lost or altered",
                stored.batch
            ),
            found: records(&e.found),
            expected: stored.to_string(),
        });
    }
    match &e.mark {
        Mark::Found(w) if stored.batch < w.batch => Err(DataLoss {
            what: format!(
                "sled ends at batch {}, but batch {} was made durable (watermark): the latest {} batches are lost",
                stored.batch,
                w.batch,
                w.batch - stored.batch
            ),
            found: stored.to_string(),
            expected: w.to_string(),
        }),
        Mark::Found(w) if stored.batch == w.batch && !stored.same_records(w) => Err(DataLoss {
            what: format!("sled and the watermark disagree about batch {}", w.batch),
            found: stored.to_string(),
            expected: w.to_string(),
        }),
        Mark::Missing if stored.batch > 0 => Err(DataLoss {
            what: format!(
                "the watermark file is missing, but sled has written batch {} with one",
                stored.batch
            ),
            found: stored.to_string(),
            expected: "a watermark".into(),
        }),
        _ => Ok(stored),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(batch: u64, records: u64) -> Tally {
        Tally {
            batch,
            records,
            digest: records * 7919,
        }
    }

    fn evidence(found: u64, stored: Option<Tally>, mark: Mark) -> Evidence {
        Evidence {
            found: Tally {
                batch: 0,
                ..tally(0, found)
            },
            stored,
            mark,
            has_tally: stored.is_some(),
        }
    }

    #[test]
    fn sled_may_be_ahead_of_the_watermark_never_behind() {
        let ok = |e: Evidence| check(&e).unwrap();
        // In step, or ahead (the crash between flush and mark).
        assert_eq!(
            ok(evidence(3, Some(tally(9, 3)), Mark::Found(tally(9, 3)))),
            tally(9, 3)
        );
        assert_eq!(
            ok(evidence(4, Some(tally(10, 4)), Mark::Found(tally(9, 3)))),
            tally(10, 4)
        );
        // Never written since the tally began, with no watermark yet (a crash at creation).
        ok(evidence(2, Some(tally(0, 2)), Mark::Missing));
        // A new directory, and a store of the format before tallies.
        ok(evidence(0, None, Mark::Missing));
        ok(Evidence {
            has_tally: false,
            ..evidence(5, None, Mark::Missing)
        });

        let lost = |e: Evidence| check(&e).unwrap_err().what;
        assert!(
            lost(evidence(3, Some(tally(8, 3)), Mark::Found(tally(9, 4))))
                .contains("batches are lost")
        );
        assert!(
            lost(evidence(2, Some(tally(9, 3)), Mark::Found(tally(9, 3))))
                .contains("lost or altered")
        );
        assert!(
            lost(evidence(3, Some(tally(9, 3)), Mark::Found(tally(9, 4)))).contains("disagree")
        );
        assert!(lost(evidence(0, None, Mark::Found(tally(9, 3)))).contains("no tally record"));
        assert!(lost(evidence(3, Some(tally(9, 3)), Mark::Missing))
            .contains("watermark file is missing"));
        assert!(
            lost(evidence(3, Some(tally(9, 3)), Mark::Unreadable("x".into()))).contains("damaged")
        );
        assert!(lost(Evidence {
            has_tally: true,
            ..evidence(5, None, Mark::Missing)
        })
        .contains("was lost"));
    }
}
