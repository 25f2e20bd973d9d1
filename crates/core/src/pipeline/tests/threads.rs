// Test code only: unwrap, expect and panic! are fine here.
//! The dynamic module's shape, natively: one worker per thread, four threads at once, over
//! one process store (`storage::process_store`) and the queues between them. Every
//! lookup lease, bucket and allowance stays exact while the threads race for them.
use super::quotas::{ok, rls_config, DAILY};
use super::*;
use crate::pipeline::fake::Process;
use crate::pipeline::quotas::GrpcOutcome;
use crate::quotas::allowance::MIN_ALLOWANCE;
use std::sync::{Arc, Barrier};

const THREADS: u32 = 4;

impl Test {
    /// A configured worker of queue `queue` on this thread, over `process`.
    fn worker_on(&self, process: &Arc<Process>, queue: u32, config: &str) -> Worker<FakeHost> {
        let mut worker = Worker::new(FakeHost::on_process(self.node.clone(), process.clone()));
        worker.set_queue(queue);
        assert!(worker.configure(config.as_bytes()), "{config}");
        worker
    }
}

/// Delivers the messages other threads queued for `worker`.
fn deliver(process: &Process, worker: &mut Worker<FakeHost>) {
    while let Some(message) = process.next_message(worker.queue().unwrap()) {
        worker.on_message(&message);
    }
}

/// Runs `body` on `THREADS` threads at once, each with its worker (queues 1 to 4) and the
/// barrier they meet at; what each returned, in queue order.
fn on_threads<T: Send + 'static>(
    config: String,
    body: impl Fn(&Test, &mut Worker<FakeHost>, &Process, &Barrier) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let process = Arc::new(Process::default());
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let body = Arc::new(body);
    let threads: Vec<_> = (1..=THREADS)
        .map(|queue| {
            let (process, barrier, body, config) = (
                process.clone(),
                barrier.clone(),
                body.clone(),
                config.clone(),
            );
            std::thread::spawn(move || {
                let t = Test::new();
                let mut worker = t.worker_on(&process, queue, &config);
                barrier.wait();
                body(&t, &mut worker, &process, &barrier)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn four_threads_share_one_lookup_and_one_bucket_exactly() {
    let cfg = config(r#""rate_limit": {"requests": 100, "period_s": 3600}"#);
    let results = on_threads(cfg, |t, w, process, barrier| {
        // All four ask for the cold key at once: one callout for the node.
        let (first, flow) = t.get(w, "sk");
        assert_eq!(flow, Flow::Pause);
        barrier.wait();
        deliver(process, w);
        barrier.wait();
        let callouts = w.host().callouts.borrow().len();
        if callouts > 0 {
            t.answer(w, Some("200"), ALICE);
        }
        barrier.wait();
        deliver(process, w);
        let log = w.host().log_of(first);
        assert!(log.resumed && log.reply.is_none(), "{log:?}");
        barrier.wait();
        // Then 60 each, racing for the bucket's 96 tokens left.
        let mut forwarded = 1;
        let mut refused = 0;
        for _ in 0..60 {
            let (id, flow) = t.get(w, "sk");
            match flow {
                Flow::Forward(_) => forwarded += 1,
                Flow::Pause => {
                    assert_eq!(w.host().log_of(id).reply.unwrap().status, 429);
                    refused += 1;
                }
            }
        }
        (callouts, forwarded, refused)
    });
    let callouts: usize = results.iter().map(|r| r.0).sum();
    let forwarded: u32 = results.iter().map(|r| r.1).sum();
    let refused: u32 = results.iter().map(|r| r.2).sum();
    assert_eq!(callouts, 1, "one lookup for the node: {results:?}");
    assert_eq!(
        forwarded, 100,
        "the bucket's 100 tokens, no more: {results:?}"
    );
    assert_eq!(forwarded + refused, THREADS * 61);
}

#[test]
fn four_threads_spend_one_node_allowance_exactly() {
    let cfg = rls_config(1_000, "open");
    let results = on_threads(cfg, move |t, w, process, barrier| {
        // The first thread finds the key and asks the rate limit service for its request:
        // the answer gives the node its allowance.
        if w.queue() == Some(1) {
            let (first, _) = t.get(w, "sk");
            deliver(process, w);
            t.answer(w, Some("200"), DAILY);
            let token = w.host().grpc_calls.borrow()[0].token;
            *w.host().grpc_answer.borrow_mut() = ok(900);
            w.on_grpc_answer(token, GrpcOutcome::Message(ok(900).len()));
            assert!(w.host().log_of(first).resumed);
        }
        barrier.wait();
        deliver(process, w);
        barrier.wait();
        // Then all four spend it, racing, until each must ask.
        let mut forwarded = 0;
        loop {
            match t.get(w, "sk").1 {
                Flow::Forward(Some(_)) => forwarded += 1,
                Flow::Forward(None) => panic!("a quota's request carries its RateLimit fields"),
                Flow::Pause => break,
            }
        }
        let lookups = w.host().callouts.borrow().len();
        (forwarded, lookups)
    });
    let forwarded: u32 = results.iter().map(|r| r.0).sum();
    let lookups: usize = results.iter().map(|r| r.1).sum();
    // The allowance (2 + MIN_ALLOWANCE) goes first; once a call carrying the node's
    // admissions is in flight, requests go on up to the node's ceiling of uncounted ones,
    // a tenth of the 900 left: exactly that many, whatever the threads' order.
    const { assert!(MIN_ALLOWANCE + 2 < 90) };
    assert_eq!(forwarded, 90, "the node's ceiling, no more: {results:?}");
    assert_eq!(
        lookups, 1,
        "the other threads read the node's entry: {results:?}"
    );
}
