//! One per filter configuration in each VM: reads the configuration, owns callouts.
use super::host::HostStore;
use super::http::Http;
use super::worker::Worker;
use crate::config::Config;
use crate::key_hash::hash_key;
use crate::slots::{create_slots, Table};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;

pub struct Root {
    worker: Rc<Worker>,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root {
            worker: Rc::new(Worker::new(context_id)),
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.worker.on_callout_answer(token, body_size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // Follow Envoy's own log level, so debug lines cost nothing unless asked for.
        proxy_wasm::set_log_level(hostcalls::get_log_level().unwrap_or(LogLevel::Info));
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::parse(&raw) {
            Ok(config) => config,
            Err(e) => {
                log::error!("apikey-filter configuration refused: {e}");
                return false;
            }
        };
        if !self.register_queue() {
            return false;
        }
        let started = super::host::now_ms();
        create_slots(&HostStore, Table::keys(config.cache.max_entries));
        create_slots(&HostStore, Table::lookup_locks());
        if config.brute_force.is_some() {
            create_slots(
                &HostStore,
                Table::client_addresses(config.cache.max_entries),
            );
        }
        log::debug!(
            "bucket slots ready in {} ms",
            super::host::now_ms().saturating_sub(started)
        );
        announce(&raw, &config);
        self.worker.set_config(config);
        true
    }

    fn on_tick(&mut self) {
        self.worker.on_tick();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.worker.is_own_queue(queue_id) {
            self.worker.on_queue(queue_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(context_id, self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Logs the effective configuration at info level once per node and configuration (every
/// VM runs `on_configure`; one line is enough), at debug level in the other VMs.
fn announce(raw: &[u8], config: &Config) {
    let digest = hash_key(raw);
    let line = format!(
        "apikey-filter {} configured: {}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    if super::host::shared_get(ANNOUNCED_KEY).as_deref() == Some(&digest[..]) {
        log::debug!("{line}");
    } else {
        super::host::shared_set(ANNOUNCED_KEY, &digest);
        log::info!("{line}");
    }
}

const ANNOUNCED_KEY: &str = "apikey_filter/v1/announced-config";

impl Root {
    /// Each VM needs a queue of its own (a queue wakes only the VM that registered it
    /// last), so its name carries a random id; re-configuring keeps the first one.
    fn register_queue(&self) -> bool {
        if self.worker.has_queue() {
            return true;
        }
        let id = RandomState::new().hash_one(self.worker.as_ref() as *const Worker as usize);
        match hostcalls::register_shared_queue(&format!("apikey_filter/v1/lookups/{id:016x}")) {
            Ok(queue_id) => {
                self.worker.set_queue(queue_id);
                true
            }
            Err(status) => {
                log::error!(
                    "apikey-filter cannot register its shared queue (status {})",
                    status as u32
                );
                false
            }
        }
    }
}
