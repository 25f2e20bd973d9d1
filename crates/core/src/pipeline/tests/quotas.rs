// Test code only: unwrap, expect and panic! are fine here.
//! Quotas through the whole pipeline: a request's own call, the node's allowance, the
//! report, the failure modes and bad answers.
use super::*;
use crate::pipeline::fake::SentGrpc;
use crate::pipeline::quotas::GrpcOutcome;
use crate::pipeline::stats::Histogram;
use crate::quotas::allowance::MIN_ALLOWANCE;
use crate::quotas::rls_messages::{self as rls, code};
use prost::Message;

pub(super) const DAILY: &str =
    r#"{"key_id": "k_alice", "owner": "acme", "quotas": [{"requests": 1000, "unit": "day"}]}"#;

pub(super) fn rls_config(sync_interval_ms: u64, failure_mode: &str) -> String {
    config(&format!(
        r#""rate_limit": null, "rate_limit_service": {{"cluster": "rls", "sync_interval_ms": {sync_interval_ms}, "failure_mode": "{failure_mode}"}}"#
    ))
}

pub(super) fn ok(remaining: u32) -> Vec<u8> {
    verdict(code::OK, remaining)
}

fn verdict(overall: i32, remaining: u32) -> Vec<u8> {
    rls::RateLimitResponse {
        overall_code: overall,
        statuses: vec![rls::DescriptorStatus {
            code: overall,
            current_limit: None,
            limit_remaining: remaining,
            duration_until_reset: Some(rls::Duration {
                seconds: 3_600,
                nanos: 0,
            }),
        }],
    }
    .encode_to_vec()
}

fn calls(worker: &Worker<FakeHost>) -> Vec<SentGrpc> {
    worker.host().grpc_calls.borrow().clone()
}

fn decoded(call: &SentGrpc) -> rls::RateLimitRequest {
    rls::RateLimitRequest::decode(call.message.as_slice()).unwrap()
}

/// Answers `worker`'s latest gRPC call with `message`.
fn answer_grpc(worker: &mut Worker<FakeHost>, message: &[u8]) {
    let token = calls(worker).last().expect("a gRPC call").token;
    *worker.host().grpc_answer.borrow_mut() = message.to_vec();
    worker.on_grpc_answer(token, GrpcOutcome::Message(message.len()));
}

fn fail_grpc(worker: &mut Worker<FakeHost>, status: u32) {
    let token = calls(worker).last().expect("a gRPC call").token;
    worker.on_grpc_answer(token, GrpcOutcome::Closed(status));
}

impl Test {
    /// A worker with `cfg` that has found "sk" (its first request asks the service, and
    /// waits for it): that request's context id.
    fn known(&self, worker: &mut Worker<FakeHost>) -> u32 {
        let (id, _) = self.cold(worker, "sk", "200", DAILY);
        assert!(worker.host().log_of(id).reply.is_none());
        id
    }
}

#[test]
fn a_key_without_allowance_asks_for_its_own_request_then_spends_the_allowance_locally() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(1_000, "open"));
    let first = t.known(&mut w);
    let call = calls(&w)[0].clone();
    assert_eq!(call.context_id, first, "the request's own call");
    assert_eq!(
        call.method,
        "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    );
    let sent = decoded(&call);
    assert_eq!((sent.domain.as_str(), sent.hits_addend), ("apikey", 1));
    let entries: Vec<_> = sent.descriptors[0]
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(entries, [("key_id", "k_alice"), ("window", "day")]);
    assert!(!w.host().log_of(first).resumed, "waits for the answer");

    answer_grpc(&mut w, &ok(900));
    let log = w.host().log_of(first);
    assert!(log.resumed && log.reply.is_none(), "{log:?}");
    assert_eq!(log.header_set("x-api-key-id").as_deref(), Some("k_alice"));
    let mut io = w.host().request(first);
    w.on_response(first, None, &mut io);
    let fields = w.host().log_of(first).response_headers;
    assert!(
        fields.contains(&(
            "ratelimit-policy".into(),
            "\"key-day\";q=1000;w=86400".into()
        )),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("ratelimit".into(), "\"key-day\";r=900;t=3600".into())),
        "{fields:?}"
    );

    // An allowance of 2 × 1 + MIN_ALLOWANCE: that many pass without a call, most of
    // them from the worker's own share of it.
    let allowance = 2 + MIN_ALLOWANCE;
    for _ in 0..allowance {
        let (_, flow) = t.get(&mut w, "sk");
        assert!(matches!(flow, Flow::Forward(Some(_))), "{flow:?}");
    }
    assert_eq!(calls(&w).len(), 1);
    assert_eq!(w.host().stat("quota.allowance"), u64::from(allowance));
    let (_, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause, "allowance spent: asks again");
    assert_eq!(calls(&w).len(), 2);
}

#[test]
fn over_the_quota_is_429_with_retry_after_and_then_refused_without_a_call() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(1_000, "open"));
    let id = t.known(&mut w);
    answer_grpc(&mut w, &verdict(code::OVER_LIMIT, 0));
    let reply = reply_of(&w, id);
    assert_denied(&reply, 429, "quota_exceeded");
    assert_eq!(reply.header("retry-after"), Some("3600"));
    assert_eq!(reply.header("ratelimit"), Some("\"key-day\";r=0;t=3600"));
    assert_eq!(w.host().stat("rate_limit_service.over_limit"), 1);
    t.advance(1_000);
    let (again, _) = t.get(&mut w, "sk");
    let reply = reply_of(&w, again);
    assert_denied(&reply, 429, "quota_exceeded");
    assert_eq!(reply.header("retry-after"), Some("3599"));
    assert_eq!(calls(&w).len(), 1);
    assert_eq!(w.host().stat("denied.quota_exceeded"), 2);
}

#[test]
fn the_exact_mode_asks_for_every_request() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(0, "open"));
    t.known(&mut w);
    answer_grpc(&mut w, &ok(900));
    for n in 2..5 {
        let (id, flow) = t.get(&mut w, "sk");
        assert_eq!(flow, Flow::Pause);
        assert_eq!(calls(&w).len(), n);
        answer_grpc(&mut w, &ok(900));
        assert!(w.host().log_of(id).resumed);
    }
    assert_eq!(w.host().stat("quota.allowance"), 0);
    assert_eq!(w.host().stat("rate_limit_service.ok"), 4);
}

#[test]
fn one_worker_reports_for_the_node_once_half_its_allowance_is_admitted() {
    let t = Test::new();
    let cfg = rls_config(1_000, "open");
    let (mut a, mut b) = (t.worker(1, &cfg), t.worker(2, &cfg));
    t.known(&mut a);
    answer_grpc(&mut a, &ok(900));
    let allowance = 2 + MIN_ALLOWANCE;
    let ticks_report = |t: &Test, a: &mut Worker<FakeHost>, b: &mut Worker<FakeHost>| {
        t.advance(1_000);
        b.on_tick();
        a.on_tick();
        [&*a, &*b]
            .iter()
            .flat_map(|w| calls(w))
            .filter(|c| c.context_id == 0)
            .collect::<Vec<SentGrpc>>()
    };
    // Less than half: no report (both workers admit, b from the node's cache entry).
    for i in 0..allowance / 2 - 1 {
        let w = if i % 2 == 0 { &mut a } else { &mut b };
        assert!(matches!(t.get(w, "sk").1, Flow::Forward(_)));
    }
    assert!(ticks_report(&t, &mut a, &mut b).is_empty());
    for _ in 0..4 {
        assert!(matches!(t.get(&mut b, "sk").1, Flow::Forward(_)));
    }
    let reports = ticks_report(&t, &mut a, &mut b);
    assert_eq!(reports.len(), 1, "one report for the node");
    // What the node held when the report was claimed: the node's own admissions and
    // the reporting worker's share; the other's share goes in a later report.
    let hits = decoded(&reports[0]).hits_addend;
    assert!(hits > 0 && hits <= allowance / 2 + 3, "{hits}");
    let a_reported = calls(&b).is_empty();
    let reporter = if a_reported { &mut a } else { &mut b };
    answer_grpc(reporter, &ok(900 - hits));
    assert_eq!(reporter.host().stat("quota.reported"), u64::from(hits));
    // The answer sets the next allowance: requests go on without a call.
    for _ in 0..20 {
        assert!(matches!(t.get(&mut a, "sk").1, Flow::Forward(_)));
    }
    assert_eq!(calls(&a).len(), 1 + usize::from(a_reported));
}

#[test]
fn a_worker_that_leaves_the_duties_to_another_has_its_admissions_reported_while_it_idles() {
    let t = Test::new();
    let cfg = rls_config(1_000, "open");
    let mut on_duty = t.worker(1, &cfg);
    let mut idle = t.worker(2, &cfg);
    idle.set_on_duty(Some(1));
    let id = t.known(&mut idle);
    fail_grpc(&mut idle, 14);
    assert!(idle.host().log_of(id).resumed);
    assert!(matches!(t.get(&mut idle, "sk").1, Flow::Forward(_)));
    assert_eq!(idle.host().stat("quota.failure_open"), 2);
    // The worker that admitted them never ticks again; the one on duty, told of the key,
    // reports them.
    t.deliver(&mut on_duty);
    t.advance(1_000);
    on_duty.on_tick();
    let report = calls(&on_duty).last().cloned().expect("a report");
    assert_eq!((report.context_id, decoded(&report).hits_addend), (0, 2));
    // Told once per key, not per request.
    assert!(matches!(t.get(&mut idle, "sk").1, Flow::Forward(_)));
    assert!(t.node.queues.borrow().get(&1).is_none_or(|q| q.is_empty()));
}

#[test]
fn while_the_service_fails_open_admits_and_reports_later_closed_refuses() {
    let t = Test::new();
    let mut open = t.worker(1, &rls_config(1_000, "open"));
    let id = t.known(&mut open);
    fail_grpc(&mut open, 14);
    let log = open.host().log_of(id);
    assert!(log.resumed && log.reply.is_none(), "{log:?}");
    assert_eq!(open.host().stat("rate_limit_service.error.grpc_status"), 1);
    // Paused: no call, admitted at once and kept.
    assert!(matches!(t.get(&mut open, "sk").1, Flow::Forward(_)));
    assert_eq!(calls(&open).len(), 1);
    assert_eq!(open.host().stat("quota.failure_open"), 2);
    t.advance(1_000);
    open.on_tick();
    let report = calls(&open).last().cloned().unwrap();
    assert_eq!((report.context_id, decoded(&report).hits_addend), (0, 2));
    // The report times out: its hits wait for the next.
    t.advance(500);
    fail_grpc(&mut open, 14);
    assert_eq!(open.host().stat("rate_limit_service.error.timeout"), 1);
    t.advance(1_000);
    open.on_tick();
    assert_eq!(decoded(calls(&open).last().unwrap()).hits_addend, 2);
    assert_eq!(open.host().stat("rate_limit_service.error.grpc_status"), 1);

    let t = Test::new();
    let mut closed = t.worker(1, &rls_config(1_000, "closed"));
    let id = t.known(&mut closed);
    fail_grpc(&mut closed, 14);
    assert_denied(
        &reply_of(&closed, id),
        503,
        "rate_limit_service_unavailable",
    );
    let (again, _) = t.get(&mut closed, "sk");
    assert_denied(
        &reply_of(&closed, again),
        503,
        "rate_limit_service_unavailable",
    );
    assert_eq!(calls(&closed).len(), 1, "paused");
}

#[test]
fn a_call_the_host_took_but_could_not_send_is_counted_as_never_sent() {
    let t = Test::new();
    let mut closed = t.worker(1, &rls_config(1_000, "closed"));
    let id = t.known(&mut closed);
    let token = calls(&closed)[0].token;
    closed.on_grpc_answer(token, GrpcOutcome::NotSent);
    assert_denied(
        &reply_of(&closed, id),
        503,
        "rate_limit_service_unavailable",
    );
    let host = closed.host();
    assert_eq!(host.stat("rate_limit_service.error.not_sent"), 1);
    assert!(host
        .histograms
        .borrow()
        .iter()
        .all(|(h, _)| *h != Histogram::RlsLatencyMs));
}

#[test]
fn a_bad_answer_is_classified_and_counted_never_a_crash() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(0, "closed"));
    let id = t.known(&mut w);
    answer_grpc(&mut w, &[0xff, 0xff, 0xff]);
    assert_denied(&reply_of(&w, id), 503, "rate_limit_service_unavailable");
    assert_eq!(w.host().stat("rate_limit_service.error.bad_answer"), 1);
    // Limitador's OVER_LIMIT, without statuses: a verdict, not a failure.
    t.advance(2_000);
    let (id, _) = t.get(&mut w, "sk");
    let limitador = rls::RateLimitResponse {
        overall_code: code::OVER_LIMIT,
        statuses: vec![],
    }
    .encode_to_vec();
    answer_grpc(&mut w, &limitador);
    let reply = reply_of(&w, id);
    assert_denied(&reply, 429, "quota_exceeded");
    assert!(reply.header("retry-after").is_some());
    let ratelimit = reply.header("ratelimit").unwrap_or_default();
    assert!(
        ratelimit.starts_with("\"key-day\";r=0;t="),
        "no statuses: the spent quota's item says nothing is left: {ratelimit}"
    );
}

#[test]
fn a_request_whose_client_left_while_it_asked_is_forgotten() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(0, "open"));
    let id = t.known(&mut w);
    w.forget(id);
    answer_grpc(&mut w, &ok(5));
    assert!(!w.host().log_of(id).resumed);
    assert_eq!(
        w.host().stat("rate_limit_service.ok"),
        0,
        "the answer had nowhere to go"
    );
}

#[test]
fn keys_without_quotas_and_filters_without_a_service_never_call() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(1_000, "open"));
    t.cold(&mut w, "other", "200", ALICE);
    let mut w2 = t.worker(2, &config(""));
    t.cold(&mut w2, "sk", "200", DAILY);
    assert!(calls(&w).is_empty() && calls(&w2).is_empty());
}

/// Steady traffic for `seconds` on two workers of a node, `per_ms_a` requests each
/// millisecond on one and one every `every_b_ms` on the other, with the service answering
/// after `latency_ms` and the workers ticking when they ask to: the gRPC calls the node
/// sent in each second (interval).
fn steady_calls(per_ms_a: u32, every_b_ms: u64, latency_ms: u64, seconds: u64) -> Vec<usize> {
    let t = Test::new();
    let big = r#"{"key_id": "k_alice", "quotas": [{"requests": 100000000, "unit": "day"}]}"#;
    let cfg = rls_config(1_000, "open");
    let (mut a, b) = (t.worker(1, &cfg), t.worker(2, &cfg));
    t.cold(&mut a, "sk", "200", big);
    let mut workers = [a, b];
    let mut answered: Vec<usize> = vec![0, 0];
    let mut pending: Vec<(u64, usize, u32)> = Vec::new();
    let mut next_tick = [0u64; 2];
    let mut per_interval = Vec::new();
    let mut sent_before = 0;
    for ms in 0..seconds * 1_000 {
        t.advance(1);
        for _ in 0..per_ms_a {
            t.get(&mut workers[0], "sk");
        }
        if ms % every_b_ms == 0 {
            t.get(&mut workers[1], "sk");
        }
        for (i, w) in workers.iter_mut().enumerate() {
            let sent = calls(w);
            for call in &sent[answered[i]..] {
                pending.push((ms + latency_ms, i, call.token));
            }
            answered[i] = sent.len();
            if ms >= next_tick[i] {
                w.on_tick();
                next_tick[i] = ms + w.host().tick_ms.get().max(1);
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.0 <= ms);
        pending = later;
        for (_, i, token) in due {
            let message = ok(99_000_000);
            *workers[i].host().grpc_answer.borrow_mut() = message.clone();
            workers[i].on_grpc_answer(token, GrpcOutcome::Message(message.len()));
        }
        if ms % 1_000 == 999 {
            let sent: usize = workers.iter().map(|w| calls(w).len()).sum();
            per_interval.push(sent - sent_before);
            sent_before = sent;
        }
    }
    per_interval
}

#[test]
fn steady_traffic_makes_one_call_per_interval() {
    let loads = [
        (1, 3, 2),
        (1, 1, 2),
        (2, 5, 5),
        (1, 10, 20),
        (3, 1, 50),
        (1, 2, 100),
        (5, 1, 10),
        (1, 50, 1),
    ];
    for (per_ms_a, every_b_ms, latency_ms) in loads {
        let per_interval = steady_calls(per_ms_a, every_b_ms, latency_ms, 8);
        // After the first seconds, in which the allowance grows to the traffic.
        assert!(
            per_interval[2..].iter().all(|&n| n <= 1),
            "{per_ms_a} a ms, one every {every_b_ms} ms, answered in {latency_ms} ms: \
             {per_interval:?}"
        );
    }
}

#[test]
fn an_answer_for_a_request_gone_meanwhile_still_settles_what_its_call_carried() {
    let t = Test::new();
    let mut w = t.worker(1, &rls_config(1_000, "open"));
    t.known(&mut w);
    fail_grpc(&mut w, 14);
    assert!(
        matches!(t.get(&mut w, "sk").1, Flow::Forward(_)),
        "admitted, kept"
    );
    t.advance(1_100); // the failure pause is over; no tick has reported yet
    let (id, flow) = t.get(&mut w, "sk");
    assert_eq!(flow, Flow::Pause);
    assert_eq!(
        decoded(calls(&w).last().unwrap()).hits_addend,
        3,
        "it carries the two"
    );
    // Its client goes; the answer arrives before the host says so.
    w.host().requests.borrow_mut().entry(id).or_default().gone = true;
    answer_grpc(&mut w, &ok(900));
    let table = crate::storage::slots::Table::quotas(100_000);
    let quota_id = crate::limits::buckets::owner_id("k_alice");
    let state =
        crate::quotas::store::read(&w.host().node.store, table, quota_id, t.node.now_ms.get())
            .expect("the key's quota state");
    assert_eq!(
        state.asking, 0,
        "nothing left waiting for an answer that came"
    );
}
