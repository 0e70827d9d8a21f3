//! Where a stream stands across the tables a run commits to: each table commits its own
//! positions, so reading resumes at the lowest, and a table that holds none of a stream (a new
//! policy, a crash during its first commit) is told apart. The one rule the runtime and the
//! sources follow.

use super::{LakeError, TableLocation};

/// One stream's committed offsets over several tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStanding {
    /// The lowest offset a table committed (`None`: no table holds the stream).
    pub lowest: Option<i64>,
    /// The highest offset a table committed.
    pub highest: Option<i64>,
    /// Some table holds none of the stream.
    pub missing_somewhere: bool,
}

impl StreamStanding {
    /// Folds the stream's committed offset in each table (`None`: that table holds none).
    pub fn over(offsets: impl IntoIterator<Item = Option<i64>>) -> Self {
        let mut s = StreamStanding::default();
        for offset in offsets {
            match offset {
                Some(v) => {
                    s.lowest = Some(s.lowest.map_or(v, |l| l.min(v)));
                    s.highest = Some(s.highest.map_or(v, |h| h.max(v)));
                }
                None => s.missing_somewhere = true,
            }
        }
        s
    }

    /// Where reading resumes when every table must get the stream whole: the lowest offset if
    /// every table holds the stream, else none (from the source's start).
    pub fn resume_at(&self) -> Option<i64> {
        if self.missing_somewhere {
            None
        } else {
            self.lowest
        }
    }
}

/// Each stream's standing over `tables` (in `streams` order).
pub(crate) async fn standings(
    tables: &[TableLocation],
    app_prefix: &str,
    streams: &[String],
) -> Result<Vec<StreamStanding>, LakeError> {
    let mut per_table = Vec::with_capacity(tables.len());
    for table in tables {
        per_table.push(table.read_positions(app_prefix, streams).await?);
    }
    Ok((0..streams.len())
        .map(|i| StreamStanding::over(per_table.iter().map(|p| p[i])))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_resumes_and_a_table_without_the_stream_is_told_apart() {
        let all = StreamStanding::over([Some(7), Some(3), Some(5)]);
        assert_eq!(
            (all.lowest, all.highest, all.missing_somewhere),
            (Some(3), Some(7), false)
        );
        assert_eq!(all.resume_at(), Some(3));
        let one_missing = StreamStanding::over([Some(7), None]);
        assert!(one_missing.missing_somewhere);
        assert_eq!(one_missing.resume_at(), None);
        assert_eq!(one_missing.lowest, Some(7));
        assert_eq!(StreamStanding::over([]), StreamStanding::default());
    }
}
