//! When what is known about a key may be trusted (the rules `cache` applies to both tiers,
//! and `entry` to choose what a full table lets go), and how long a key whose lookups
//! keep failing is not asked about.
use crate::config::CacheConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustRules {
    pub ttl_s: u64,
    pub negative_ttl_s: u64,
    pub stale_if_error_s: u64,
    /// 0: no refresh ahead.
    pub refresh_ahead_pct: u8,
    /// The node's feed epoch: entries of any other are forgotten.
    pub epoch: u32,
}

/// How far what an entry says may be trusted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// A found key within its trust period; `refresh_due` in its last part.
    Fresh {
        refresh_due: bool,
    },
    /// A found key past its trust period, usable while the key service fails.
    Stale,
    /// An unknown key within `negative_ttl_s`.
    Negative,
    Useless,
}

impl TrustRules {
    pub fn new(cache: &CacheConfig) -> TrustRules {
        TrustRules {
            ttl_s: cache.ttl_s,
            negative_ttl_s: cache.negative_ttl_s,
            stale_if_error_s: cache.stale_if_error_s,
            refresh_ahead_pct: cache.refresh_ahead_pct,
            epoch: 0,
        }
    }

    /// A found key stored at `stored_at_ms` (also a worker's copy of one).
    pub fn found(&self, stored_at_ms: u64, now_ms: u64) -> Trust {
        let (age, ttl) = (age_ms(stored_at_ms, now_ms), ms(self.ttl_s));
        if age < ttl {
            let refresh_from = ttl / 100 * u64::from(100 - self.refresh_ahead_pct.min(100));
            Trust::Fresh {
                refresh_due: self.refresh_ahead_pct > 0 && age >= refresh_from,
            }
        } else if age < ttl.saturating_add(ms(self.stale_if_error_s)) {
            Trust::Stale
        } else {
            Trust::Useless
        }
    }
}

/// A clock that steps back makes an entry younger, never older.
pub(super) fn age_ms(stored_at_ms: u64, now_ms: u64) -> u64 {
    now_ms.saturating_sub(stored_at_ms)
}

pub(super) fn ms(seconds: u64) -> u64 {
    seconds.saturating_mul(1000)
}

/// The key service's failures for one key since its last answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    pub in_a_row: u8,
    /// No lookup of the key before this.
    pub paused_until_ms: u64,
}

/// The pauses after the 2nd, 3rd, 4th and any later failure in a row.
const PAUSES_MS: [u64; 4] = [1_000, 2_000, 4_000, 5_000];

impl Failures {
    pub fn after_failure(self, now_ms: u64) -> Failures {
        let in_a_row = self.in_a_row.saturating_add(1);
        Failures {
            in_a_row,
            paused_until_ms: now_ms.saturating_add(pause_ms(in_a_row)),
        }
    }

    pub fn is_paused(&self, now_ms: u64) -> bool {
        now_ms < self.paused_until_ms
    }

    /// When the failure that started the current pause happened.
    pub fn last_failed_ms(&self) -> u64 {
        self.paused_until_ms.saturating_sub(pause_ms(self.in_a_row))
    }
}

fn pause_ms(in_a_row: u8) -> u64 {
    match usize::from(in_a_row) {
        0 | 1 => 0,
        n => PAUSES_MS.get(n - 2).copied().unwrap_or(5_000),
    }
}
