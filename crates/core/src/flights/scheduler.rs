//! A worker's tick: works out, from the earliest pending deadline, how often the host must
//! call the worker back, and asks it to change only when that changes.

/// Never tick faster than this, whatever is due.
pub const MIN_TICK_MS: u64 = 50;
/// Check at least this often while anything is pending, so a deadline is never missed
/// by much even when the host's timer drifts.
pub const MAX_TICK_MS: u64 = 1_000;

#[derive(Debug, Default)]
pub struct Scheduler {
    /// The period the host was last asked for; 0: no tick.
    period_ms: u64,
}

impl Scheduler {
    /// The tick period to ask the host for at `now_ms`, given the earliest pending
    /// deadline, when it differs from the current one; `Some(0)` stops the tick.
    pub fn plan(&mut self, now_ms: u64, earliest_deadline_ms: Option<u64>) -> Option<u64> {
        let period_ms = match earliest_deadline_ms {
            None => 0,
            Some(at) => at.saturating_sub(now_ms).clamp(MIN_TICK_MS, MAX_TICK_MS),
        };
        (period_ms != self.period_ms).then(|| {
            self.period_ms = period_ms;
            period_ms
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_only_while_something_is_pending_and_says_so_once() {
        let mut scheduler = Scheduler::default();
        assert_eq!(scheduler.plan(0, None), None, "already off");
        assert_eq!(scheduler.plan(0, Some(300)), Some(300));
        assert_eq!(scheduler.plan(0, Some(300)), None, "unchanged");
        assert_eq!(scheduler.plan(280, Some(300)), Some(MIN_TICK_MS));
        assert_eq!(
            scheduler.plan(300, Some(300)),
            None,
            "due now: still the fastest"
        );
        assert_eq!(scheduler.plan(300, Some(60_000)), Some(MAX_TICK_MS));
        assert_eq!(scheduler.plan(400, None), Some(0));
    }
}
