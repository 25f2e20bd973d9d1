//! What a worker's desks (`lookups`, `feed`, `quotas`) share: the host, the worker's name
//! among the node's workers, its configured state and its log throttle. A desk is handed
//! the context for one event and leaves what the worker must do after it as effects:
//! the requests whose lookup landed (`lookups`), and when to be woken (`wake_by`).
use super::per_key::PerKeyStats;
use super::ports::{Callout, Host, NotSent};
use super::warnings::Warnings;
use crate::config::Config;
use crate::keys::answer::LookupFailure;
use crate::keys::cache::KeyCache;
use std::rc::Rc;

/// A lease outlives its callout's timeout by this much before others take over.
pub const LEASE_MARGIN_MS: u64 = 1_000;

pub struct Context<H: Host> {
    pub host: H,
    /// This worker's queue: how it is woken, and its name in leases.
    pub queue: Option<u32>,
    /// The worker that keeps the node's duties (polls the change feed, reports what the
    /// node admitted unasked), when not this one.
    pub on_duty: Option<u32>,
    pub warnings: Warnings,
    /// None until a configuration is taken.
    pub configured: Option<Configured>,
    /// The earliest deadline a desk set since the worker last planned its tick.
    wake_by: Option<u64>,
}

/// What a configuration makes of a worker.
pub struct Configured {
    pub config: Rc<Config>,
    pub cache: KeyCache,
    pub per_key: Option<PerKeyStats>,
}

impl<H: Host> Context<H> {
    pub fn new(host: H) -> Context<H> {
        Context {
            host,
            queue: None,
            on_duty: None,
            warnings: Warnings::default(),
            configured: None,
            wake_by: None,
        }
    }

    /// This worker's name in leases and among the node's workers.
    pub fn me(&self) -> u32 {
        self.queue.unwrap_or_default()
    }

    pub fn config(&self) -> Option<&Rc<Config>> {
        self.configured.as_ref().map(|c| &c.config)
    }

    /// A desk has something to do at `at_ms`, earlier than it had: the worker plans its
    /// tick again once the event is handled.
    pub fn wake_by(&mut self, at_ms: u64) {
        self.wake_by = Some(self.wake_by.map_or(at_ms, |by| by.min(at_ms)));
    }

    /// Whether a desk set a new deadline since the last call.
    pub fn take_wake_by(&mut self) -> bool {
        self.wake_by.take().is_some()
    }

    /// The key service's answer being delivered: its `:status`, and its body when it is no
    /// longer than `max_body` (`body_size` long).
    pub fn delivered(
        &self,
        body_size: usize,
        max_body: usize,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let status = self.host.callout_status();
        let body = (body_size <= max_body).then(|| self.host.callout_body(body_size));
        (status, body)
    }

    /// Sends `GET path` to the key service.
    pub fn send_to_key_service(&self, config: &Config, path: &str) -> Result<u32, NotSent> {
        let service = &config.key_service;
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", &service.authority),
        ];
        headers.extend(
            service
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        );
        self.host.send_callout(&Callout {
            cluster: &service.cluster,
            headers,
            timeout_ms: service.timeout_ms,
        })
    }
}

/// What a call to the key service that the host did not send counts as.
pub fn failure_of(why: NotSent) -> LookupFailure {
    match why {
        NotSent::Refused => LookupFailure::NotSent,
        NotSent::AnsweredAtOnce => LookupFailure::Overloaded,
    }
}
