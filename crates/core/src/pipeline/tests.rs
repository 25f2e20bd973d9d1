#![cfg(test)]
// Test code only (declared under #[cfg(test)] in pipeline/mod.rs): unwrap, expect and panic! are fine here.
//! The whole pipeline against a fake host: every row of the status table, the identity
//! and RateLimit headers, the key service's failures, and one callout per key for the
//! node, natively.
use super::fake::{FakeHost, FakeNode, Reply};
use super::worker::{Flow, Worker};
use crate::request::header_map::Header;
use crate::vocabulary::key_hash::{hash_hex, hash_key};
use std::rc::Rc;

const BASE: &str = r#""key_service": {"cluster": "keys", "timeout_ms": 500}"#;

fn config(extra: &str) -> String {
    if extra.is_empty() {
        format!("{{{BASE}}}")
    } else {
        format!("{{{BASE}, {extra}}}")
    }
}

struct Test {
    node: Rc<FakeNode>,
    next_context: std::cell::Cell<u32>,
}

impl Test {
    fn new() -> Test {
        let node = Rc::new(FakeNode::default());
        node.now_ms.set(1_700_000_000_000);
        Test {
            node,
            next_context: std::cell::Cell::new(100),
        }
    }

    /// A configured worker whose queue is `queue`.
    fn worker(&self, queue: u32, config: &str) -> Worker<FakeHost> {
        let mut worker = Worker::new(FakeHost::new(self.node.clone()));
        worker.set_queue(queue);
        assert!(worker.configure(config.as_bytes()), "{config}");
        worker
    }

    fn advance(&self, ms: u64) {
        self.node.now_ms.set(self.node.now_ms.get() + ms);
    }

    /// Sends a request with `headers` (plus `:method` and `:path`) to `worker`: its context
    /// id and what the headers phase decided.
    fn send(
        &self,
        worker: &mut Worker<FakeHost>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u32, Flow) {
        let context_id = self.next_context.get();
        self.next_context.set(context_id + 1);
        let mut all: Vec<Header> =
            vec![(b":method", method.as_bytes()), (b":path", path.as_bytes())];
        all.extend(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        let mut io = worker.host().request(context_id);
        let flow = worker.on_request(context_id, &mut io, &all);
        (context_id, flow)
    }

    fn get(&self, worker: &mut Worker<FakeHost>, key: &str) -> (u32, Flow) {
        self.send(worker, "GET", "/", &[("x-api-key", key)])
    }

    /// Delivers the messages queued for `worker`.
    fn deliver(&self, worker: &mut Worker<FakeHost>) {
        let queue = worker.queue().unwrap();
        loop {
            let message = self
                .node
                .queues
                .borrow_mut()
                .get_mut(&queue)
                .and_then(|q| q.pop_front());
            match message {
                Some(message) => worker.on_message(&message),
                None => break,
            }
        }
    }

    /// Answers `worker`'s latest callout with `status` (None: a reset) and `body`.
    fn answer(&self, worker: &mut Worker<FakeHost>, status: Option<&str>, body: &str) {
        let token = worker
            .host()
            .callouts
            .borrow()
            .last()
            .expect("a callout")
            .token;
        *worker.host().answer.borrow_mut() = (
            status.map(|s| s.as_bytes().to_vec()),
            body.as_bytes().to_vec(),
        );
        worker.on_callout_answer(token, body.len());
    }

    /// Two workers of one node, each with a request for the cold key "sk": `a` asks the
    /// key service, `b` waits for it. `b`'s request's context id.
    fn a_asks_and_b_waits(&self) -> (Worker<FakeHost>, Worker<FakeHost>, u32) {
        let (mut a, mut b) = (self.worker(1, &config("")), self.worker(2, &config("")));
        self.get(&mut a, "sk");
        self.deliver(&mut a);
        let (on_b, _) = self.get(&mut b, "sk");
        self.deliver(&mut b);
        assert_eq!(b.host().stat("key_service.joined"), 1);
        (a, b, on_b)
    }

    /// Two workers with `ttl_s` 10 and refresh ahead 20 %: both hold "sk" from 0 s (`b`
    /// as a copy); at 8 s `a`'s request starts a refresh, answered at once: the node's
    /// entry is stored at 8 s, `b`'s copy still says 0 s.
    fn a_refreshes_while_b_holds_an_older_copy(&self) -> (Worker<FakeHost>, Worker<FakeHost>) {
        let cfg = config(r#""cache": {"ttl_s": 10, "refresh_ahead_pct": 20}"#);
        let (mut a, mut b) = (self.worker(1, &cfg), self.worker(2, &cfg));
        self.cold(&mut a, "sk", "200", ALICE);
        self.get(&mut b, "sk");
        self.advance(8_000);
        self.get(&mut a, "sk");
        self.deliver(&mut a);
        self.answer(&mut a, Some("200"), ALICE);
        (a, b)
    }

    /// A request for `key` through a cold cache, answered by the key service with `status`
    /// and `body`: the request's reply, if it got one.
    fn cold(
        &self,
        worker: &mut Worker<FakeHost>,
        key: &str,
        status: &str,
        body: &str,
    ) -> (u32, Option<Reply>) {
        let (context_id, flow) = self.get(worker, key);
        assert_eq!(flow, Flow::Pause);
        self.deliver(worker);
        self.answer(worker, Some(status), body);
        (context_id, worker.host().log_of(context_id).reply)
    }
}

fn reply_of(worker: &Worker<FakeHost>, context_id: u32) -> Reply {
    worker.host().log_of(context_id).reply.expect("a reply")
}

fn assert_denied(reply: &Reply, status: u32, code: &str) {
    assert_eq!(
        (reply.status, reply.code().as_str()),
        (status, code),
        "{reply:?}"
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.header("www-authenticate").is_some(),
        status == 401,
        "{reply:?}"
    );
}

const ALICE: &str = r#"{"key_id": "k_alice", "owner": "acme", "scopes": ["orders:read"]}"#;

#[test]
fn a_missing_key_is_401_without_a_lookup() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (id, flow) = t.send(&mut w, "GET", "/", &[]);
    assert_eq!(flow, Flow::Pause);
    assert_denied(&reply_of(&w, id), 401, "api_key_missing");
    assert_eq!(w.host().stat("denied.api_key_missing"), 1);
    assert!(w.host().callouts.borrow().is_empty());
}

#[test]
fn a_repeated_key_is_401_duplicate() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (id, _) = t.send(
        &mut w,
        "GET",
        "/",
        &[("x-api-key", "a"), ("x-api-key", "b")],
    );
    assert_denied(&reply_of(&w, id), 401, "api_key_duplicate");
}

#[test]
fn a_malformed_key_is_401_invalid_without_a_lookup() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let long = "k".repeat(1025);
    for key in [long.as_str(), "has\u{7f}del"] {
        let (id, _) = t.get(&mut w, key);
        assert_denied(&reply_of(&w, id), 401, "api_key_invalid");
    }
    t.deliver(&mut w);
    assert!(w.host().callouts.borrow().is_empty());
}

#[test]
fn a_found_key_is_forwarded_with_its_identity_and_only_the_hash_leaves() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        &config(r#""key_sources": [{"header": "x-api-key"}, {"query": "api_key"}]"#),
    );
    let (id, flow) = t.send(
        &mut w,
        "GET",
        "/orders?api_key=sk-1&x=1",
        &[("x-api-key-id", "forged"), ("x-api-key-owner", "forged")],
    );
    assert_eq!(flow, Flow::Pause);
    t.deliver(&mut w);
    let callout = w.host().callouts.borrow()[0].clone();
    assert_eq!(callout.cluster, "keys");
    assert_eq!(
        callout.header(":path"),
        Some(format!("/v1/keys/{}", hash_hex(&hash_key(b"sk-1"))).as_str())
    );
    assert!(callout
        .headers
        .iter()
        .all(|(n, v)| !n.contains("sk-1") && !v.contains("sk-1")));
    t.answer(&mut w, Some("200"), ALICE);
    let log = w.host().log_of(id);
    assert!(log.reply.is_none() && log.resumed, "{log:?}");
    assert_eq!(log.removed, vec!["x-api-key-id", "x-api-key-owner"]);
    assert_eq!(log.header_set(":path").as_deref(), Some("/orders?x=1"));
    assert_eq!(log.header_set("x-api-key-id").as_deref(), Some("k_alice"));
    assert_eq!(log.header_set("x-api-key-owner").as_deref(), Some("acme"));
    assert_eq!(
        log.header_set("x-api-key-scopes").as_deref(),
        Some("orders:read")
    );
    assert_eq!(log.log_fingerprint, None, "named by its identity headers");

    // The second request is a cache hit, forwarded at once, with its RateLimit fields.
    let (id, flow) = t.get(&mut w, "sk-1");
    let Flow::Forward(Some(rate_headers)) = flow else {
        panic!("{flow:?}")
    };
    assert_eq!(
        rate_headers.fields(),
        [
            ("ratelimit-policy", "\"apikey\";q=100;w=60"),
            ("ratelimit", "\"apikey\";r=98;t=2")
        ]
    );
    w.on_response(id, Some(rate_headers), &mut w.host().request(id));
    assert_eq!(w.host().log_of(id).response_headers.len(), 2);
    assert_eq!(w.host().callouts.borrow().len(), 1);
    let stats = w.host().stats();
    assert_eq!(
        (
            stats["allowed"],
            stats["cache.miss"],
            stats["cache.hit"],
            stats["key_service.found"]
        ),
        (2, 1, 1, 1)
    );
}

#[test]
fn an_empty_identity_value_is_left_out() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (id, _) = t.cold(&mut w, "sk-2", "200", r#"{"key_id": "k_2"}"#);
    let log = w.host().log_of(id);
    assert_eq!(log.header_set("x-api-key-id").as_deref(), Some("k_2"));
    assert_eq!(log.header_set("x-api-key-owner"), None);
    assert_eq!(log.header_set("x-api-key-scopes"), None);
}

#[test]
fn an_unknown_key_is_401_and_remembered() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (_, reply) = t.cold(&mut w, "nope", "404", "");
    assert_denied(&reply.unwrap(), 401, "api_key_invalid");
    let (id, _) = t.get(&mut w, "nope");
    assert_denied(&reply_of(&w, id), 401, "api_key_invalid");
    let fingerprint = &hash_hex(&hash_key(b"nope"))[..12];
    assert_eq!(
        w.host().log_of(id).log_fingerprint.as_deref(),
        Some(fingerprint)
    );
    assert_eq!(w.host().callouts.borrow().len(), 1);
    assert_eq!(w.host().stat("cache.negative_hit"), 1);
    assert_eq!(w.host().stat("denied.api_key_invalid"), 2);
}

#[test]
fn revoked_and_expired_keys_are_401() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (_, reply) = t.cold(&mut w, "rev", "200", r#"{"key_id": "k", "revoked": true}"#);
    assert_denied(&reply.unwrap(), 401, "api_key_revoked");
    let past = t.node.now_ms.get() / 1000 - 1;
    let (_, reply) = t.cold(
        &mut w,
        "exp",
        "200",
        &format!(r#"{{"key_id": "k", "expires_at": {past}}}"#),
    );
    assert_denied(&reply.unwrap(), 401, "api_key_expired");
}

#[test]
fn a_key_lacking_a_scope_a_rule_demands_is_403() {
    let t = Test::new();
    let rules =
        r#""rules": [{"path_prefix": "/orders", "methods": ["POST"], "scopes": ["orders:write"]}]"#;
    let mut w = t.worker(1, &config(rules));
    t.cold(&mut w, "sk", "200", ALICE);
    let (id, flow) = t.send(&mut w, "POST", "/orders/1", &[("x-api-key", "sk")]);
    assert_eq!(flow, Flow::Pause);
    assert_denied(&reply_of(&w, id), 403, "permission_denied");
    // For the access log: who it was, and which key (the request is not forwarded).
    let log = w.host().log_of(id);
    assert_eq!(log.header_set("x-api-key-id").as_deref(), Some("k_alice"));
    let fingerprint = &hash_hex(&hash_key(b"sk"))[..12];
    assert_eq!(log.log_fingerprint.as_deref(), Some(fingerprint));
    let (_, flow) = t.send(&mut w, "GET", "/orders/1", &[("x-api-key", "sk")]);
    assert!(matches!(flow, Flow::Forward(_)), "no rule for GET");
}

#[test]
fn an_empty_bucket_is_429_with_retry_after_and_ratelimit_fields() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let limited =
        r#"{"key_id": "k_lim", "rate_limit": {"requests": 1, "period_s": 60, "burst": 1}}"#;
    let (id, reply) = t.cold(&mut w, "lim", "200", limited);
    assert!(reply.is_none() && w.host().log_of(id).resumed);
    let (id, _) = t.get(&mut w, "lim");
    let reply = reply_of(&w, id);
    assert_denied(&reply, 429, "rate_limit_exceeded");
    assert_eq!(reply.header("retry-after"), Some("60"));
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"apikey\";q=1;w=60")
    );
    assert_eq!(reply.header("ratelimit"), Some("\"apikey\";r=0;t=60"));
}

#[test]
fn a_contended_bucket_fails_closed() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    t.cold(&mut w, "sk", "200", ALICE);
    // Another worker rewrites every slot before each of this one's writes.
    *t.node.store.interleave.borrow_mut() = Some(Box::new(
        |s: &crate::storage::shared_store::fake::FakeStore| {
            let keys: Vec<String> = s
                .data
                .borrow()
                .keys()
                .filter(|k| k.contains("/bucket/"))
                .cloned()
                .collect();
            for key in keys {
                s.next_cas.set(s.next_cas.get() + 1);
                let value = s.data.borrow()[&key].0.clone();
                s.data.borrow_mut().insert(key, (value, s.next_cas.get()));
            }
        },
    ));
    let (id, _) = t.get(&mut w, "sk");
    assert_denied(&reply_of(&w, id), 429, "rate_limit_exceeded");
    assert_eq!(w.host().stat("rate_limit.unavailable"), 1);
}

#[test]
fn a_client_that_spent_its_failure_budget_is_429_before_any_lookup() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        &config(r#""brute_force": {"max_failures": 2, "period_s": 60}"#),
    );
    let requests = w.host().requests.clone();
    let from = |id: u32| {
        requests.borrow_mut().entry(id).or_default().client_address =
            Some(b"203.0.113.9:4711".to_vec());
    };
    for _ in 0..2 {
        from(t.next_context.get());
        let (id, _) = t.send(
            &mut w,
            "GET",
            "/",
            &[("x-api-key", "a"), ("x-api-key", "b")],
        );
        assert_denied(&reply_of(&w, id), 401, "api_key_duplicate");
    }
    from(t.next_context.get());
    let (id, _) = t.get(&mut w, "any");
    let reply = reply_of(&w, id);
    assert_denied(&reply, 429, "too_many_failed_attempts");
    assert_eq!(reply.header("retry-after"), Some("30"));
    t.deliver(&mut w);
    assert!(w.host().callouts.borrow().is_empty());
    // Another address has its own budget.
    w.host()
        .requests
        .borrow_mut()
        .entry(t.next_context.get())
        .or_default()
        .client_address = Some(b"[2001:db8::1]:80".to_vec());
    let (_, flow) = t.get(&mut w, "any");
    assert_eq!(flow, Flow::Pause);
    assert!(
        w.host().log_of(t.next_context.get() - 1).reply.is_none(),
        "looked up, not refused"
    );
}

#[test]
fn a_failing_key_service_is_503_closed_and_forwards_anonymously_open() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (_, reply) = t.cold(&mut w, "sk", "500", "");
    assert_denied(&reply.unwrap(), 503, "key_service_unavailable");
    assert_eq!(
        w.host()
            .stats_of(["key_service.error", "key_service.error.status"]),
        [1, 1]
    );

    let mut open = t.worker(2, &config(r#""failure_mode": "open""#));
    let (id, reply) = t.cold(&mut open, "sk2", "500", "");
    assert!(reply.is_none());
    let log = open.host().log_of(id);
    assert!(
        log.resumed && log.header_set("x-api-key-id").is_none(),
        "{log:?}"
    );
    assert_eq!(open.host().stats_of(["failure_open", "allowed"]), [1, 1]);
}

#[test]
fn a_stale_entry_serves_while_the_key_service_fails() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        &config(r#""cache": {"ttl_s": 60, "stale_if_error_s": 300}"#),
    );
    t.cold(&mut w, "sk", "200", ALICE);
    t.advance(61_000);
    let (id, reply) = t.cold(&mut w, "sk", "504", "upstream request timeout");
    assert!(reply.is_none());
    assert_eq!(
        w.host().log_of(id).header_set("x-api-key-id").as_deref(),
        Some("k_alice")
    );
    assert_eq!(
        w.host()
            .stats_of(["cache.stale", "key_service.error.timeout"]),
        [1, 1]
    );
    t.advance(300_000);
    let (_, reply) = t.cold(&mut w, "sk", "504", "");
    assert_denied(&reply.unwrap(), 503, "key_service_unavailable");
}

#[test]
fn a_callout_the_host_refuses_to_send_is_counted_and_answered() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    w.host().refuse_callouts.set(true);
    let (id, _) = t.get(&mut w, "sk");
    t.deliver(&mut w);
    assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
    assert_eq!(
        w.host()
            .stats_of(["key_service.error", "key_service.error.not_sent"]),
        [1, 1]
    );
    assert!(
        w.host().histograms.borrow().is_empty(),
        "no latency for a callout never sent"
    );
}

#[test]
fn a_callout_the_host_took_but_could_not_send_is_answered_as_never_sent() {
    // The dynamic module sends callouts later, from Envoy's main thread.
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (id, _) = t.get(&mut w, "sk");
    t.deliver(&mut w);
    let token = w.host().callouts.borrow()[0].token;
    w.on_callout_refused(token, crate::pipeline::ports::NotSent::Refused);
    assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.not_sent"), 1);
    w.on_callout_refused(token, crate::pipeline::ports::NotSent::Refused);
    assert_eq!(w.host().stat("key_service.error"), 1, "counted once");
}

#[test]
fn an_answer_over_64_kib_is_a_failure_and_is_not_read() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let huge = format!(r#"{{"key_id": "k", "pad": "{}"}}"#, "x".repeat(64 * 1024));
    let (_, reply) = t.cold(&mut w, "sk", "200", &huge);
    assert_denied(&reply.unwrap(), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.bad_record"), 1);
}

#[test]
fn a_reset_is_a_failure_never_a_verdict() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (id, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause);
    t.deliver(&mut w);
    t.answer(&mut w, None, "");
    assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.reset"), 1);
    let (_, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause, "asked again: nothing was cached");
}

#[test]
fn without_a_configuration_a_request_is_refused_not_forwarded() {
    let t = Test::new();
    let mut w = Worker::new(FakeHost::new(t.node.clone()));
    let (id, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause);
    assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
}

#[test]
fn a_refused_configuration_leaves_the_worker_unconfigured() {
    let t = Test::new();
    let mut w = Worker::new(FakeHost::new(t.node.clone()));
    assert!(!w.configure(br#"{"key_service": {"cluster": "k"}, "nope": 1}"#));
    assert!(!w.configure(b""));
    let (id, _) = t.get(&mut w, "sk");
    assert_eq!(reply_of(&w, id).status, 503);
}

#[test]
fn requests_together_share_one_callout_on_one_worker_even_if_the_first_goes_away() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (first, _) = t.get(&mut w, "sk");
    let (second, _) = t.get(&mut w, "sk");
    w.host().requests.borrow_mut().get_mut(&first).unwrap().gone = true;
    w.forget(first);
    t.deliver(&mut w);
    assert_eq!(w.host().callouts.borrow().len(), 1);
    t.answer(&mut w, Some("200"), ALICE);
    assert!(w.host().log_of(second).resumed);
    assert!(!w.host().log_of(first).resumed);
    assert_eq!(w.host().unparked.get(), 1, "back to its own context after");
}

#[test]
fn workers_of_a_node_share_one_callout_per_key() {
    let t = Test::new();
    let (mut a, mut b) = (t.worker(1, &config("")), t.worker(2, &config("")));
    let (on_a, _) = t.get(&mut a, "sk");
    let (on_b, _) = t.get(&mut b, "sk");
    t.deliver(&mut a);
    t.deliver(&mut b);
    assert_eq!(
        (
            a.host().callouts.borrow().len(),
            b.host().callouts.borrow().len()
        ),
        (1, 0)
    );
    assert_eq!(b.host().stat("key_service.joined"), 1);
    assert!(
        b.host().tick_ms.get() > 0,
        "b ticks to take over if a goes silent"
    );
    t.answer(&mut a, Some("200"), ALICE);
    t.deliver(&mut b);
    assert!(a.host().log_of(on_a).resumed && b.host().log_of(on_b).resumed);
    assert_eq!(
        b.host().log_of(on_b).header_set("x-api-key-id").as_deref(),
        Some("k_alice")
    );
    assert_eq!(b.host().stat("key_service.found"), 0, "b asked nobody");
    t.advance(2_000);
    b.on_tick();
    assert_eq!(b.host().tick_ms.get(), 0, "nothing pending: no tick");
}

#[test]
fn a_worker_whose_peer_went_silent_takes_the_lookup_over() {
    let t = Test::new();
    let (_gone, mut b, on_b) = t.a_asks_and_b_waits();
    // a (gone) never answers. Its lease holds for the timeout (500 ms) plus a margin (1 s).
    t.advance(1_499);
    b.on_tick();
    assert!(b.host().callouts.borrow().is_empty());
    t.advance(1);
    b.on_tick();
    assert_eq!(b.host().callouts.borrow().len(), 1, "taken over");
    t.answer(&mut b, Some("404"), "");
    assert_denied(&reply_of(&b, on_b), 401, "api_key_invalid");
}

#[test]
fn a_peers_failure_answers_the_waiting_requests_at_once() {
    let t = Test::new();
    let (mut a, mut b, on_b) = t.a_asks_and_b_waits();
    t.answer(&mut a, Some("500"), "");
    t.deliver(&mut b);
    assert_denied(&reply_of(&b, on_b), 503, "key_service_unavailable");
    assert_eq!(
        b.host().stat("key_service.error"),
        0,
        "counted once, by the worker that asked"
    );
}

#[test]
fn callout_latency_is_recorded() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    t.get(&mut w, "sk");
    t.deliver(&mut w);
    t.advance(42);
    t.answer(&mut w, Some("200"), ALICE);
    assert_eq!(
        w.host().histograms.borrow().as_slice(),
        &[(super::stats::Histogram::KeyServiceLatencyMs, 42)]
    );
}

// -- the change feed, refresh ahead, the failure pause ----------------------------------

const FEED: &str = r#""key_service": {"cluster": "keys", "timeout_ms": 500,
    "changes": {"interval_ms": 1000, "ttl_s": 3600}}, "cache": {"ttl_s": 60}"#;

fn feed_config() -> String {
    format!("{{{FEED}}}")
}

fn feed_answer(cursor: &str, keys: &[&str]) -> String {
    let hashes: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", hash_hex(&hash_key(k.as_bytes()))))
        .collect();
    format!(
        r#"{{"cursor": "{cursor}", "key_hashes": [{}]}}"#,
        hashes.join(",")
    )
}

fn last_path(worker: &Worker<FakeHost>) -> String {
    let callouts = worker.host().callouts.borrow();
    callouts
        .last()
        .and_then(|c| c.header(":path"))
        .unwrap_or_default()
        .to_string()
}

impl Test {
    /// Ticks `worker` and answers its feed poll, if it made one, with `status` and `body`.
    fn poll(&self, worker: &mut Worker<FakeHost>, status: &str, body: &str) -> bool {
        let sent = worker.host().callouts.borrow().len();
        worker.on_tick();
        if worker.host().callouts.borrow().len() == sent {
            return false;
        }
        assert!(
            last_path(worker).starts_with("/v1/key-changes"),
            "{}",
            last_path(worker)
        );
        self.answer(worker, Some(status), body);
        true
    }
}

#[test]
fn every_worker_tells_how_old_the_feeds_last_good_poll_is() {
    let t = Test::new();
    let (mut a, mut b) = (t.worker(1, &feed_config()), t.worker(2, &feed_config()));
    assert!(t.poll(&mut a, "200", &feed_answer("c-1", &[])));
    for _ in 0..3 {
        t.advance(1_000);
        assert!(t.poll(&mut a, "503", "") || t.poll(&mut b, "503", ""));
    }
    t.advance(1_000);
    b.on_tick();
    a.on_tick();
    let age = |w: &Worker<FakeHost>| w.host().stat("key_service.changes.age_s");
    assert_eq!((age(&a), age(&b)), (4, 4), "four seconds of failed polls");
    t.advance(1_000);
    let answer = feed_answer("c-2", &[]);
    assert!(t.poll(&mut a, "200", &answer) || t.poll(&mut b, "200", &answer));
    t.advance(1_000);
    a.on_tick();
    b.on_tick();
    assert_eq!((age(&a), age(&b)), (1, 1), "a second after the good poll");
}

#[test]
fn one_worker_per_node_polls_each_interval_with_the_cursor() {
    let t = Test::new();
    let (mut a, mut b) = (t.worker(1, &feed_config()), t.worker(2, &feed_config()));
    assert!(
        a.host().tick_ms.get() > 0 && b.host().tick_ms.get() > 0,
        "both tick"
    );
    assert!(t.poll(&mut a, "200", &feed_answer("c-1", &[])));
    assert_eq!(
        last_path(&a),
        "/v1/key-changes",
        "the first poll has no cursor"
    );
    assert!(!t.poll(&mut b, "200", "{}"), "polled already this interval");
    t.advance(1_000);
    assert!(t.poll(&mut b, "200", &feed_answer("c-2", &[])));
    assert_eq!(last_path(&b), "/v1/key-changes?after=c-1");
    assert!(!t.poll(&mut a, "200", "{}"));
    t.advance(1_000);
    assert!(t.poll(&mut a, "200", &feed_answer("c-3", &[])));
    assert_eq!(last_path(&a), "/v1/key-changes?after=c-2");
    assert_eq!(
        a.host().stat("key_service.changes.ok") + b.host().stat("key_service.changes.ok"),
        3
    );
}

#[test]
fn a_changed_key_is_forgotten_on_the_node_and_in_every_workers_copies() {
    let t = Test::new();
    let (mut a, mut b) = (t.worker(1, &feed_config()), t.worker(2, &feed_config()));
    assert!(t.poll(&mut a, "200", &feed_answer("c-1", &[])));
    t.deliver(&mut b);
    t.cold(&mut a, "sk", "200", ALICE);
    let (_, flow) = t.get(&mut b, "sk");
    assert!(matches!(flow, Flow::Forward(_)), "b has its copy now");
    t.advance(1_000);
    assert!(t.poll(&mut a, "200", &feed_answer("c-2", &["sk", "never-seen"])));
    assert_eq!(
        a.host().stat("key_service.changes.forgotten"),
        1,
        "the node held one of them"
    );
    t.deliver(&mut b); // a's news
    for w in [&mut a, &mut b] {
        let (_, flow) = t.get(w, "sk");
        assert_eq!(flow, Flow::Pause, "asked again, not served from a copy");
    }
    t.deliver(&mut a);
    t.answer(
        &mut a,
        Some("200"),
        r#"{"key_id": "k_alice", "revoked": true}"#,
    );
}

#[test]
fn while_the_feed_is_healthy_keys_are_trusted_for_its_ttl_and_then_for_cache_ttl() {
    let t = Test::new();
    let mut w = t.worker(1, &feed_config());
    assert!(t.poll(&mut w, "200", &feed_answer("c-1", &[])));
    t.cold(&mut w, "sk", "200", ALICE);
    t.advance(61_000);
    // Polls kept answering: still trusted.
    for _ in 0..2 {
        assert!(t.poll(&mut w, "200", &feed_answer("c-1", &[])));
        t.advance(1_000);
    }
    assert!(t.poll(&mut w, "200", &feed_answer("c-1", &[])));
    let (_, flow) = t.get(&mut w, "sk");
    assert!(matches!(flow, Flow::Forward(_)), "63 s old, feed healthy");
    // The feed fails for three intervals: back to cache.ttl_s.
    for _ in 0..3 {
        t.advance(1_000);
        assert!(t.poll(&mut w, "503", ""));
    }
    assert_eq!(w.host().stat("key_service.changes.error"), 3);
    let (_, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause, "66 s old, feed dead: past cache.ttl_s");
}

#[test]
fn a_410_forgets_everything_and_starts_again_without_a_cursor() {
    let t = Test::new();
    let (mut a, mut b) = (t.worker(1, &feed_config()), t.worker(2, &feed_config()));
    assert!(t.poll(&mut a, "200", &feed_answer("c-1", &[])));
    t.deliver(&mut b); // a's news: the node's first cursor
    t.cold(&mut a, "sk", "200", ALICE);
    t.cold(&mut a, "unknown", "404", "");
    let (_, flow) = t.get(&mut b, "sk");
    assert!(matches!(flow, Flow::Forward(_)));
    t.advance(1_000);
    assert!(t.poll(&mut a, "410", ""));
    assert_eq!(
        last_path(&a),
        "/v1/key-changes",
        "asked again at once, without a cursor"
    );
    t.answer(&mut a, Some("200"), &feed_answer("c-9", &[]));
    assert_eq!(a.host().stat("key_service.changes.reset"), 1);
    t.deliver(&mut b);
    for (w, key) in [(&mut a, "sk"), (&mut b, "sk")] {
        let (_, flow) = t.get(w, key);
        assert_eq!(flow, Flow::Pause, "{key}: forgotten");
    }
    let (_, flow) = t.get(&mut a, "unknown");
    assert_eq!(flow, Flow::Pause, "unknown: forgotten");
}

#[test]
fn the_first_cursor_a_node_gets_forgets_what_it_cached_before() {
    // The feed fails from the start; a key is cached meanwhile (and may change unseen).
    let t = Test::new();
    let mut w = t.worker(1, &feed_config());
    assert!(t.poll(&mut w, "503", ""));
    t.cold(&mut w, "sk", "200", ALICE);
    let (_, flow) = t.get(&mut w, "sk");
    assert!(matches!(flow, Flow::Forward(_)), "cached");
    // Its first answer only says where the feed stands: nothing before it will be listed.
    t.advance(1_000);
    assert!(t.poll(&mut w, "200", &feed_answer("c-5", &[])));
    let (_, flow) = t.get(&mut w, "sk");
    assert_eq!(
        flow,
        Flow::Pause,
        "asked again: it may have changed before c-5"
    );
    t.deliver(&mut w);
    t.answer(&mut w, Some("200"), ALICE);
    // From then on the cursor moves as usual: nothing more is forgotten.
    t.advance(1_000);
    assert!(t.poll(&mut w, "200", &feed_answer("c-6", &[])));
    let (_, flow) = t.get(&mut w, "sk");
    assert!(matches!(flow, Flow::Forward(_)), "kept");
    assert_eq!(w.host().stat("key_service.changes.reset"), 0, "not a 410");
}

#[test]
fn a_bad_feed_answer_is_a_failure_and_forgets_nothing() {
    let t = Test::new();
    let mut w = t.worker(1, &feed_config());
    assert!(t.poll(&mut w, "200", &feed_answer("c-1", &[])));
    t.cold(&mut w, "sk", "200", ALICE);
    let bad_hash = r#"{"cursor": "c-2", "key_hashes": ["not-a-hash"]}"#.to_string();
    let huge = format!(
        r#"{{"cursor": "c-2", "key_hashes": ["{}"]}}"#,
        "a".repeat(600 * 1024)
    );
    for body in ["{\"cursor\": ", bad_hash.as_str(), huge.as_str()] {
        t.advance(1_000);
        assert!(t.poll(&mut w, "200", body));
    }
    assert_eq!(w.host().stat("key_service.changes.error"), 3);
    let (_, flow) = t.get(&mut w, "sk");
    assert!(matches!(flow, Flow::Forward(_)), "nothing flushed");
    t.advance(1_000);
    assert!(t.poll(&mut w, "200", &feed_answer("c-2", &[])));
    assert_eq!(
        last_path(&w),
        "/v1/key-changes?after=c-1",
        "the cursor did not move"
    );
}

#[test]
fn a_key_in_use_is_refreshed_in_the_background_once_and_never_waits() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        &config(r#""cache": {"ttl_s": 10, "refresh_ahead_pct": 20}"#),
    );
    t.cold(&mut w, "sk", "200", ALICE);
    t.advance(8_000);
    let (id, flow) = t.get(&mut w, "sk");
    assert!(matches!(flow, Flow::Forward(_)), "answered from the cache");
    assert!(w.host().log_of(id).reply.is_none());
    let (_, flow) = t.get(&mut w, "sk");
    assert!(matches!(flow, Flow::Forward(_)));
    t.deliver(&mut w);
    assert_eq!(
        w.host().callouts.borrow().len(),
        2,
        "one refresh, not one per request"
    );
    assert_eq!(w.host().stat("cache.refresh"), 1);
    t.answer(
        &mut w,
        Some("200"),
        r#"{"key_id": "k_alice", "revoked": true}"#,
    );
    let (id, _) = t.get(&mut w, "sk");
    assert_denied(&reply_of(&w, id), 401, "api_key_revoked");
    t.advance(7_000);
    let (_, flow) = t.get(&mut w, "sk");
    assert_eq!(
        flow,
        Flow::Pause,
        "the refreshed entry: due again only near its own end"
    );
}

#[test]
fn another_worker_does_not_refresh_what_one_already_did() {
    let t = Test::new();
    let (_a, mut b) = t.a_refreshes_while_b_holds_an_older_copy();
    t.advance(2_000); // a's lease says "answered" no longer
    let (_, flow) = t.get(&mut b, "sk");
    assert!(matches!(flow, Flow::Forward(_)));
    t.deliver(&mut b);
    assert!(
        b.host().callouts.borrow().is_empty(),
        "the node's entry is fresh: no refresh"
    );
    assert_eq!(b.host().stat("cache.refresh"), 0);
}

#[test]
fn after_two_failures_in_a_row_a_key_is_not_asked_for_while_paused() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    for _ in 0..2 {
        let (_, reply) = t.cold(&mut w, "sk", "500", "");
        assert_denied(&reply.unwrap(), 503, "key_service_unavailable");
    }
    for _ in 0..5 {
        t.advance(100);
        let (id, _) = t.get(&mut w, "sk");
        t.deliver(&mut w);
        assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
    }
    assert_eq!(w.host().callouts.borrow().len(), 2);
    assert_eq!(w.host().stat("key_service.paused"), 5);
    t.advance(500); // 1 s after the second failure
    let (_, reply) = t.cold(&mut w, "sk", "200", ALICE);
    assert!(
        reply.is_none(),
        "asked again, and the answer ends the pause"
    );
}

#[test]
fn a_410_to_a_poll_without_a_cursor_is_a_failure_not_another_reset() {
    let t = Test::new();
    let mut w = t.worker(1, &feed_config());
    assert!(t.poll(&mut w, "410", ""));
    assert_eq!(
        w.host().callouts.borrow().len(),
        1,
        "not asked again at once"
    );
    assert_eq!(
        w.host()
            .stats_of(["key_service.changes.reset", "key_service.changes.error"]),
        [0, 1]
    );
}

// -- key format and restrictions --------------------------------------------------------

#[test]
fn a_key_out_of_format_is_401_invalid_without_a_lookup_and_charged() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        &config(
            r#""key_format": {"prefixes": ["ghp_"], "checksum": "crc32"},
                   "brute_force": {"max_failures": 3, "period_s": 60}"#,
        ),
    );
    for key in [
        "ghp_zQWBuTSOoRi4A9spHcVY5ncnsDkxkJ0mLq18",
        "xyz_zQWBuTSOoRi4A9spHcVY5ncnsDkxkJ0mLq17",
    ] {
        w.host()
            .requests
            .borrow_mut()
            .entry(t.next_context.get())
            .or_default()
            .client_address = Some(b"203.0.113.9:1".to_vec());
        let (id, _) = t.get(&mut w, key);
        assert_denied(&reply_of(&w, id), 401, "api_key_invalid");
    }
    t.deliver(&mut w);
    assert!(w.host().callouts.borrow().is_empty(), "no lookup");
    let (_, flow) = t.get(&mut w, "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");
    assert_eq!(flow, Flow::Pause, "the well-formed key is looked up");
    t.deliver(&mut w);
    assert_eq!(w.host().callouts.borrow().len(), 1);
    assert_eq!(w.host().stat("denied.api_key_invalid"), 2);
}

#[test]
fn a_key_bound_to_addresses_and_sites_is_refused_elsewhere_before_its_scopes_and_bucket() {
    let t = Test::new();
    let rules = r#""rules": [{"path_prefix": "/admin", "scopes": ["admin"]}]"#;
    let mut w = t.worker(1, &config(rules));
    let bound = r#"{"key_id": "k_bound", "rate_limit": {"requests": 1, "period_s": 60},
        "allowed_cidrs": ["203.0.113.0/24", "2001:db8::/32"],
        "allowed_referrers": ["https://app.example.com/*"]}"#;
    let requests = w.host().requests.clone();
    let from = |id: u32, address: &str| {
        requests.borrow_mut().entry(id).or_default().client_address =
            Some(address.as_bytes().to_vec());
    };
    from(t.next_context.get(), "198.51.100.1:5");
    let (id, flow) = t.send(
        &mut w,
        "GET",
        "/",
        &[("x-api-key", "sk"), ("referer", "https://app.example.com/")],
    );
    assert_eq!(flow, Flow::Pause);
    t.deliver(&mut w);
    t.answer(&mut w, Some("200"), bound);
    assert_denied(&reply_of(&w, id), 403, "address_not_allowed");
    let mut send = |address: &str, headers: &[(&str, &str)], path: &str| {
        from(t.next_context.get(), address);
        let mut all = vec![("x-api-key", "sk")];
        all.extend_from_slice(headers);
        let (id, flow) = t.send(&mut w, "GET", path, &all);
        (w.host().log_of(id).reply, flow)
    };
    let (reply, _) = send(
        "[2001:db8::7]:443",
        &[("referer", "https://evil.test/")],
        "/",
    );
    assert_denied(&reply.unwrap(), 403, "referrer_not_allowed");
    let (reply, _) = send("203.0.113.5:1", &[], "/");
    assert_denied(&reply.unwrap(), 403, "referrer_not_allowed");
    let (reply, _) = send(
        "203.0.113.5:1",
        &[("origin", "https://app.example.com")],
        "/admin",
    );
    assert_denied(&reply.unwrap(), 403, "permission_denied");
    let (reply, flow) = send(
        "203.0.113.5:1",
        &[("origin", "https://app.example.com")],
        "/",
    );
    assert!(
        reply.is_none() && matches!(flow, Flow::Forward(Some(_))),
        "the one token"
    );
    let (reply, _) = send(
        "203.0.113.5:1",
        &[("referer", "https://app.example.com/x")],
        "/",
    );
    assert_denied(&reply.unwrap(), 429, "rate_limit_exceeded");
    assert_eq!(w.host().stat("denied.address_not_allowed"), 1);
    assert_eq!(w.host().stat("denied.referrer_not_allowed"), 2);
}

#[test]
fn a_record_whose_restriction_does_not_parse_is_a_key_service_failure() {
    let t = Test::new();
    let mut w = t.worker(1, &config(""));
    let (_, reply) = t.cold(
        &mut w,
        "sk",
        "200",
        r#"{"key_id": "k", "allowed_cidrs": ["10.0.0.0/33"]}"#,
    );
    assert_denied(&reply.unwrap(), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.bad_record"), 1);
}

#[test]
fn per_key_stats_count_each_known_keys_requests_allowed_and_denied() {
    let t = Test::new();
    let rules = r#""rules": [{"path_prefix": "/admin", "scopes": ["admin"]}], "per_key_stats": {"max_keys": 1}"#;
    let mut w = t.worker(1, &config(rules));
    t.cold(&mut w, "sk", "200", ALICE);
    t.send(&mut w, "GET", "/admin", &[("x-api-key", "sk")]);
    t.get(&mut w, "sk");
    t.cold(&mut w, "other", "200", r#"{"key_id": "k_bob"}"#);
    t.cold(&mut w, "unknown", "404", "");
    let stats = w.host().stats();
    assert_eq!(
        (
            stats.get("key.k_alice.allowed"),
            stats.get("key.k_alice.denied")
        ),
        (Some(&2), Some(&1))
    );
    assert_eq!(stats.get("key.other.allowed"), Some(&1), "past max_keys");
    assert_eq!(stats.get("key.k_bob.allowed"), None);
    assert!(
        !stats.keys().any(|name| name.contains("unknown")),
        "only known keys"
    );
}

#[test]
fn a_copy_refreshed_from_another_workers_refresh_is_trusted_as_that_entry_not_longer() {
    let t = Test::new();
    let (_a, mut b) = t.a_refreshes_while_b_holds_an_older_copy();
    t.advance(1_500);
    t.get(&mut b, "sk"); // b's copy is due: it takes the refreshed entry, stored at 8 s
    t.deliver(&mut b);
    assert!(b.host().callouts.borrow().is_empty());
    t.advance(8_499); // 17.999 s: the entry's last moment
    let (_, flow) = t.get(&mut b, "sk");
    assert!(matches!(flow, Flow::Forward(_)));
    t.advance(1); // 18 s: 10 s after the entry was stored
    let (_, flow) = t.get(&mut b, "sk");
    assert_eq!(flow, Flow::Pause, "not trusted past the entry it came from");
}

mod quotas;
mod threads;

/// Answers `worker`'s callout `token` (not necessarily its latest).
fn answer_token(
    worker: &mut Worker<FakeHost>,
    token: u32,
    status: &str,
    body: &str,
    overloaded: bool,
) {
    *worker.host().answer.borrow_mut() =
        (Some(status.as_bytes().to_vec()), body.as_bytes().to_vec());
    worker.host().overloaded.set(overloaded);
    worker.on_callout_answer(token, body.len());
    worker.host().overloaded.set(false);
}

fn last_token(worker: &Worker<FakeHost>) -> u32 {
    worker
        .host()
        .callouts
        .borrow()
        .last()
        .expect("a callout")
        .token
}

#[test]
fn a_revocation_the_feed_lists_while_a_lookup_flies_is_not_undone_by_its_answer() {
    let t = Test::new();
    let mut w = t.worker(1, &feed_config());
    assert!(t.poll(&mut w, "200", &feed_answer("c-1", &[])));
    let (parked, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause);
    t.deliver(&mut w);
    let lookup = last_token(&w);
    // The key service read the record before the revocation; the feed lists it first.
    t.advance(1_000);
    assert!(t.poll(&mut w, "200", &feed_answer("c-2", &["sk"])));
    answer_token(&mut w, lookup, "200", ALICE, false);
    assert_eq!(w.host().stat("key_service.superseded"), 1);
    assert_eq!(
        w.host().log_of(parked).reply,
        None,
        "still waiting, on a new lookup"
    );
    t.deliver(&mut w);
    assert_ne!(last_token(&w), lookup, "asked again");
    assert!(last_path(&w).starts_with("/v1/keys/"));
    t.answer(&mut w, Some("404"), "");
    assert_denied(&reply_of(&w, parked), 401, "api_key_invalid");
    let (again, _) = t.get(&mut w, "sk");
    assert_denied(&reply_of(&w, again), 401, "api_key_invalid");
}

#[test]
fn a_lookup_envoy_refuses_for_load_is_refused_even_with_failure_mode_open() {
    let t = Test::new();
    let mut w = t.worker(1, &config(r#""failure_mode": "open""#));
    let (id, _) = t.get(&mut w, "made-up");
    t.deliver(&mut w);
    let overflow =
        "upstream connect error or disconnect/reset before headers. reset reason: overflow";
    let token = last_token(&w);
    answer_token(&mut w, token, "503", overflow, true);
    assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.overloaded"), 1);
    // proxy-wasm's way: Envoy answers the call inside `send`, and the answer is lost.
    w.host().answer_at_once.set(true);
    let (id, _) = t.get(&mut w, "made-up-2");
    t.deliver(&mut w);
    w.host().answer_at_once.set(false);
    assert_denied(&reply_of(&w, id), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.overloaded"), 2);
    assert_eq!(w.host().stat("failure_open"), 0);
    // The key service's own failure still opens the gate, as configured.
    let (id, _) = t.get(&mut w, "another");
    t.deliver(&mut w);
    t.answer(&mut w, Some("500"), "");
    assert!(w.host().log_of(id).resumed);
}

#[test]
fn lookups_past_max_pending_are_not_sent_and_refused() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        r#"{"key_service": {"cluster": "keys", "max_pending": 2}, "failure_mode": "open"}"#,
    );
    let ids: Vec<u32> = ["k1", "k2", "k3"]
        .iter()
        .map(|k| {
            let (id, _) = t.get(&mut w, k);
            t.deliver(&mut w);
            id
        })
        .collect();
    assert_eq!(w.host().callouts.borrow().len(), 2, "two in flight at most");
    assert_denied(&reply_of(&w, ids[2]), 503, "key_service_unavailable");
    assert_eq!(w.host().stat("key_service.error.overloaded"), 1);
    let token = last_token(&w);
    answer_token(&mut w, token, "200", ALICE, false);
    let (id, _) = t.get(&mut w, "k4");
    t.deliver(&mut w);
    assert_eq!(w.host().callouts.borrow().len(), 3, "room again");
    assert_eq!(w.host().log_of(id).reply, None);
}

#[test]
fn brute_force_charges_each_lookup_and_gives_it_back_when_the_key_is_found() {
    let t = Test::new();
    let mut w = t.worker(
        1,
        &config(r#""failure_mode": "open", "brute_force": {"max_failures": 2, "period_s": 3600}"#),
    );
    let requests = w.host().requests.clone();
    let from = |address: &str| {
        requests
            .borrow_mut()
            .entry(t.next_context.get())
            .or_default()
            .client_address = Some(address.as_bytes().to_vec());
    };
    // Found keys cost nothing, however many.
    for key in ["good-1", "good-2", "good-3"] {
        from("[2001:db8:0:7::1]:1");
        let (_, reply) = t.cold(&mut w, key, "200", ALICE);
        assert_eq!(reply, None, "{key}");
    }
    // A failing key service forwards unverified keys (open), each charged, to the /64.
    for (key, address) in [
        ("bad-1", "[2001:db8:0:7::2]:1"),
        ("bad-2", "[2001:db8:0:7:ffff::9]:1"),
    ] {
        from(address);
        let (id, _) = t.cold(&mut w, key, "500", "");
        assert!(w.host().log_of(id).resumed, "{key}");
    }
    from("[2001:db8:0:7::3]:1");
    let (id, _) = t.get(&mut w, "bad-3");
    assert_denied(&reply_of(&w, id), 429, "too_many_failed_attempts");
    assert_eq!(w.host().stat("failure_open"), 2);
    from("[2001:db8:0:8::3]:1");
    let (_, flow) = t.get(&mut w, "bad-3");
    assert_eq!(flow, Flow::Pause, "another /64 has its own budget");
}
