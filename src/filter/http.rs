//! One per request: reads and strips the key, then decides from the cache or waits for
//! the key service.
use super::host;
use super::worker::{Cached, Handled, Outcome, RateHeaders, Request, Worker};
use crate::client_address::without_port;
use crate::config::Config;
use crate::denial::Denial;
use crate::extract::{extract, KeyOutcome};
use crate::header_map;
use crate::key_hash::fingerprint;
use crate::rules::matching_rule;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::rc::Rc;

pub struct Http {
    context_id: u32,
    worker: Rc<Worker>,
    /// Set when the request took a token without waiting; a request that waited finds
    /// its fields with the worker.
    rate_headers: Option<RateHeaders>,
}

impl Http {
    pub fn new(context_id: u32, worker: Rc<Worker>) -> Http {
        Http {
            context_id,
            worker,
            rate_headers: None,
        }
    }

    fn on_request(&mut self) -> Action {
        let Some(config) = self.worker.config() else {
            return Action::Continue;
        };
        let serialized = host::header_bytes(MapType::HttpRequestHeaders);
        let headers = header_map::parse(&serialized);
        let pseudo = |name| header_map::first(&headers, name).unwrap_or_default();
        let (method, path) = (pseudo(":method"), pseudo(":path"));

        // Strip first, decide after: a denied request's key reaches no access log either.
        let extraction = extract(&config.key_sources, &headers, path);
        for name in &extraction.remove_headers {
            host::remove_request_header(name);
        }
        let names = &config.identity_headers;
        for name in [&names.key_id, &names.owner, &names.scopes] {
            if header_map::first(&headers, name).is_some() {
                host::remove_request_header(name);
            }
        }
        if let Some(rewritten) = &extraction.rewritten_path {
            host::set_request_header(":path", rewritten);
        }

        let client = config.brute_force.and_then(|_| {
            hostcalls::get_property(vec!["source", "address"])
                .ok()
                .flatten()
                .and_then(|address| without_port(&address))
        });
        if self
            .worker
            .refuse_if_budget_spent(&config, client.as_deref())
        {
            return Action::Pause;
        }
        let key = match extraction.outcome {
            KeyOutcome::Key(key) => key,
            KeyOutcome::Missing => return self.deny(&config, client.as_deref(), Denial::Missing),
            KeyOutcome::Duplicate => {
                return self.deny(&config, client.as_deref(), Denial::Duplicate)
            }
            KeyOutcome::Malformed => {
                return self.deny(&config, client.as_deref(), Denial::Malformed)
            }
        };
        let now_ms = host::now_ms();
        let (key_hash, cached) = self.worker.cache_lookup(&key, now_ms, &config);
        host::set_log_fingerprint(fingerprint(&key_hash).as_str());
        let request = Request {
            client,
            key_hash,
            rule: matching_rule(&config.rules, method, path),
            config: config.clone(),
            now_ms,
        };
        let metrics = &self.worker.metrics;
        match cached {
            Cached::Hit(known) => {
                metrics.count(metrics.cache_hit);
                self.proceed(self.worker.finish(&request, Outcome::Known(&known)))
            }
            Cached::NegativeHit => {
                metrics.count(metrics.cache_negative_hit);
                self.proceed(self.worker.finish(&request, Outcome::Deny(Denial::Invalid)))
            }
            Cached::Miss { stale } => {
                metrics.count(metrics.cache_miss);
                self.worker.ask_key_service(self.context_id, request, stale);
                Action::Pause
            }
        }
    }

    fn deny(&self, config: &Config, client: Option<&str>, denial: Denial) -> Action {
        self.worker.deny(config, client, denial);
        Action::Pause
    }

    fn proceed(&mut self, handled: Handled) -> Action {
        match handled {
            Handled::Forward(rate_headers) => {
                self.rate_headers = rate_headers;
                Action::Continue
            }
            Handled::Answered => Action::Pause,
        }
    }
}

impl Context for Http {
    fn on_done(&mut self) -> bool {
        self.worker.forget(self.context_id);
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.on_request()
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let rate_headers = self
            .rate_headers
            .take()
            .or_else(|| self.worker.take_rate_headers(self.context_id));
        for (name, value) in rate_headers.iter().flat_map(RateHeaders::fields) {
            host::add_response_header(name, value);
        }
        Action::Continue
    }
}
