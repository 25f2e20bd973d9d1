//! The `log` crate's lines written through a host's log call. Both hosts number levels
//! alike: 0 trace, 1 debug, 2 info, 3 warn, 4 error, 5 critical.

pub const INFO: u32 = 2;
pub const CRITICAL: u32 = 5;

/// Writes each line with `write(level, line)`.
pub struct HostLogger {
    pub write: fn(u32, &str),
}

impl HostLogger {
    /// Makes this the `log` crate's logger, at info level until the host's is known, and
    /// has a panic logged at critical level.
    pub fn install(&'static self) {
        let _ = log::set_logger(self);
        log::set_max_level(log::LevelFilter::Info);
        let write = self.write;
        std::panic::set_hook(Box::new(move |info| {
            write(CRITICAL, &format!("apikey-filter panicked: {info}"));
        }));
    }
}

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        (self.write)(number(record.level()), &record.args().to_string());
    }

    fn flush(&self) {}
}

/// A level's number in the hosts' scheme.
pub fn number(level: log::Level) -> u32 {
    match level {
        log::Level::Trace => 0,
        log::Level::Debug => 1,
        log::Level::Info => INFO,
        log::Level::Warn => 3,
        log::Level::Error => 4,
    }
}
