//! Messages ignored in a row: how many were delivered since the customer last
//! reacted (an open, a click, a purchase), with the delivery times of the latest of
//! them, so a reaction reported late ends the row only up to its own time. The
//! profile keeps one per channel, the arbiter's ledger one over all channels (the
//! sunset).

use crate::time::Millis;

/// The customer reacted at `at`: the deliveries after it are still ignored in a row,
/// the earlier ones are not. `delivered_at` holds the latest `kept` delivery times of
/// the row, oldest first.
pub fn end_row_at(count: &mut u32, delivered_at: &mut Vec<Millis>, at: Millis, kept: usize) {
    let remembered = delivered_at.len();
    delivered_at.retain(|delivered| *delivered > at);
    let after = delivered_at.len();
    // Every remembered delivery came after the reaction and the list is full: older
    // ones counted may have too, so the count stands. Counts from versions that
    // remembered no times are cleared, as they were.
    if !(after == remembered && remembered == kept) {
        *count = after as u32;
    }
}

/// One customer's row before a merge: the count, the delivery times kept (oldest
/// first) and the customer's own latest reaction.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub count: u32,
    pub delivered_at: &'a [Millis],
    pub reacted_at: Option<Millis>,
}

impl Row<'_> {
    /// The deliveries counted without a time kept (older than every time kept) that
    /// no reaction of the merged customer at `reacted_at` ended: all of them if the
    /// oldest time kept is after it (or, with no time kept, if this customer's own
    /// reaction is the merged one), none otherwise.
    fn untimed_left(&self, reacted_at: Option<Millis>) -> u32 {
        let untimed = self
            .count
            .saturating_sub(u32::try_from(self.delivered_at.len()).unwrap_or(u32::MAX));
        let still_ignored = match (self.delivered_at.first(), reacted_at) {
            (_, None) => true,
            (Some(oldest), Some(r)) => *oldest > r,
            (None, Some(r)) => self.reacted_at.is_some_and(|own| own >= r),
        };
        if still_ignored {
            untimed
        } else {
            0
        }
    }
}

/// The row of two customers merged into one: every delivery of either after the
/// merged customer's latest reaction (`reacted_at`, the later of the two), the latest
/// `kept` of them with their times. Returns the count and the times, oldest first.
pub fn merge_rows(
    a: Row<'_>,
    b: Row<'_>,
    reacted_at: Option<Millis>,
    kept: usize,
) -> (u32, Vec<Millis>) {
    let mut times: Vec<Millis> = a
        .delivered_at
        .iter()
        .chain(b.delivered_at)
        .copied()
        .filter(|t| reacted_at.is_none_or(|r| *t > r))
        .collect();
    times.sort_unstable();
    let timed = u32::try_from(times.len()).unwrap_or(u32::MAX);
    let count = timed
        .saturating_add(a.untimed_left(reacted_at))
        .saturating_add(b.untimed_left(reacted_at));
    if times.len() > kept {
        times.drain(..times.len() - kept);
    }
    (count, times)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(count: u32, delivered_at: &[Millis], reacted_at: Option<Millis>) -> Row<'_> {
        Row {
            count,
            delivered_at,
            reacted_at,
        }
    }

    #[test]
    fn a_reaction_ends_the_row_up_to_its_time() {
        let (mut count, mut times) = (3, vec![10, 20, 30]);
        end_row_at(&mut count, &mut times, 25, 4);
        assert_eq!((count, times), (1, vec![30]));
        // A full list every time of which is later: older deliveries counted stand.
        let (mut count, mut times) = (9, vec![10, 20]);
        end_row_at(&mut count, &mut times, 5, 2);
        assert_eq!((count, times), (9, vec![10, 20]));
    }

    #[test]
    fn merged_rows_are_the_union_after_the_latest_reaction() {
        // One customer ignored three messages, the other reacted at 25 after two.
        let merged = merge_rows(
            row(3, &[10, 20, 30], None),
            row(1, &[40], Some(25)),
            Some(25),
            32,
        );
        assert_eq!(merged, (2, vec![30, 40]));
        // Neither reacted: both rows count, in time order.
        let merged = merge_rows(row(2, &[10, 30], None), row(2, &[20, 40], None), None, 32);
        assert_eq!(merged, (4, vec![10, 20, 30, 40]));
        // Only the latest times are kept; the count keeps them all.
        let merged = merge_rows(row(2, &[10, 30], None), row(2, &[20, 40], None), None, 3);
        assert_eq!(merged, (4, vec![20, 30, 40]));
    }

    #[test]
    fn deliveries_counted_without_times_count_unless_a_later_reaction_ended_them() {
        // 40 ignored, the latest 2 kept (from 100 on); the other customer's reaction
        // at 50 came before them all.
        let merged = merge_rows(
            row(40, &[100, 110], None),
            row(0, &[], Some(50)),
            Some(50),
            2,
        );
        assert_eq!(merged, (40, vec![100, 110]));
        // A reaction at 105 ends the untimed ones and the first kept.
        let merged = merge_rows(
            row(40, &[100, 110], None),
            row(0, &[], Some(105)),
            Some(105),
            2,
        );
        assert_eq!(merged, (1, vec![110]));
        // A count with no times (an earlier version's): kept unless the other
        // customer reacted later than this one.
        let merged = merge_rows(row(5, &[], Some(10)), row(0, &[], Some(10)), Some(10), 2);
        assert_eq!(merged.0, 5);
        let merged = merge_rows(row(5, &[], Some(10)), row(0, &[], Some(11)), Some(11), 2);
        assert_eq!(merged.0, 0);
    }
}
