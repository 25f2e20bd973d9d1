//! One throttle for every warning a worker logs, so that an outage or a flood does not
//! flood the log: at most one line per `INTERVAL_MS`, and the next one says how many
//! were held back. Stats count every event; the log only tells that it happens.
pub const INTERVAL_MS: u64 = 10_000;

#[derive(Default)]
pub struct Warnings {
    /// When the last warning was logged (None: never), and how many were held back since.
    last: (Option<u64>, u32),
}

impl Warnings {
    /// Logs `line()` at warn level unless a warning was logged less than `INTERVAL_MS`
    /// ago; the line is only made when it is logged. Returns whether it was.
    pub fn warn(&mut self, now_ms: u64, line: impl FnOnce() -> String) -> bool {
        let (last, held_back) = self.last;
        if last.is_some_and(|at| now_ms.saturating_sub(at) < INTERVAL_MS) {
            self.last = (last, held_back.saturating_add(1));
            return false;
        }
        self.last = (Some(now_ms), 0);
        let line = line();
        log::warn!("{line} ({held_back} similar warning(s) held back)");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_whatever_its_cause() {
        let mut warnings = Warnings::default();
        let mut logged = |at| warnings.warn(at, || "x".into());
        assert!(logged(0), "the very first one, even at time 0");
        assert!(!logged(1));
        assert!(!logged(INTERVAL_MS - 1));
        assert!(logged(INTERVAL_MS));
        assert!(!logged(INTERVAL_MS + 5));
    }

    #[test]
    fn the_line_is_only_made_when_logged() {
        let mut warnings = Warnings::default();
        let mut made = 0;
        for at in 0..100 {
            warnings.warn(at, || {
                made += 1;
                String::new()
            });
        }
        assert_eq!(made, 1);
        assert_eq!(warnings.last, (Some(0), 99));
    }
}
