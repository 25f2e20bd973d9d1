//! `GET /metrics`: the service's counters in Prometheus' text format. No key, and no key
//! hash, is ever a label.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($field:ident: $help:literal),* $(,)?) => {
        #[derive(Default)]
        pub struct Metrics {
            $(pub $field: AtomicU64,)*
        }

        impl Metrics {
            /// The counters, and `gauges` (name, help, value), as Prometheus text.
            pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
                let mut out = String::new();
                $(
                    let name = concat!("apikey_keyservice_", stringify!($field), "_total");
                    let _ = writeln!(out, "# HELP {name} {}", $help);
                    let _ = writeln!(out, "# TYPE {name} counter");
                    let _ = writeln!(out, "{name} {}", self.$field.load(Ordering::Relaxed));
                )*
                for (name, help, value) in gauges {
                    let _ = writeln!(out, "# HELP apikey_keyservice_{name} {help}");
                    let _ = writeln!(out, "# TYPE apikey_keyservice_{name} gauge");
                    let _ = writeln!(out, "apikey_keyservice_{name} {value}");
                }
                out
            }
        }
    };
}

counters! {
    lookups_found: "Lookups answered with a record.",
    lookups_not_found: "Lookups answered 404.",
    lookups_from_memory: "Lookups answered without reading the database.",
    lookups_refused: "Filter API requests refused (bad hash, bad cursor or no proxy token).",
    feed_polls: "Change feed polls answered 200.",
    feed_polls_from_memory: "Change feed polls with nothing new, answered without reading the database.",
    feed_gone: "Change feed polls answered 410.",
    admin_changes: "Admin calls that changed a key.",
    admin_refused: "Admin calls answered with an error.",
    store_errors: "Database errors.",
}

pub fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
