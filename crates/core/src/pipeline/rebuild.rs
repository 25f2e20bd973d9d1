//! A worker whose code panicked is built again: a host that catches panics (the dynamic
//! module: a panic there would take Envoy down) keeps serving with a new worker over the
//! same node-wide store.
use super::ports::Host;
use super::stats::Counter;
use super::worker::Worker;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f` on the worker in `slot`. If `f` panics, the worker's state is in doubt: it is
/// abandoned (the requests it holds are refused, never forwarded), the `panics` counter
/// moves, and a worker configured anew from `raw_config` takes its place, over the same
/// host and so the same node-wide store. The panic is handed back.
pub fn run_or_rebuild<H: Host, T>(
    slot: &mut Option<Worker<H>>,
    raw_config: &[u8],
    queue: u32,
    f: impl FnOnce(&mut Worker<H>) -> T,
) -> Result<Option<T>, Box<dyn std::any::Any + Send>> {
    let Some(worker) = slot.as_mut() else {
        return Ok(None);
    };
    let panic = match catch_unwind(AssertUnwindSafe(|| f(worker))) {
        Ok(done) => return Ok(Some(done)),
        Err(panic) => panic,
    };
    if let Some(broken) = slot.take() {
        let on_duty = broken.on_duty();
        let host = broken.abandon();
        host.count(Counter::Panics);
        log::error!("apikey-filter: a panic was caught; the worker is built again");
        let mut worker = Worker::new(host);
        worker.set_queue(queue);
        worker.set_on_duty(on_duty);
        if worker.configure(raw_config) {
            *slot = Some(worker);
        }
    }
    Err(panic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::{FakeHost, FakeNode};
    use crate::pipeline::worker::Flow;
    use std::rc::Rc;

    #[test]
    fn a_panic_rebuilds_the_worker_refuses_what_it_held_and_keeps_the_node_store() {
        let raw = br#"{"key_service": {"cluster": "keys"}, "rate_limit": {"requests": 5, "period_s": 60}}"#;
        let fake = Rc::new(FakeNode::default());
        let mut worker = Worker::new(FakeHost::new(fake.clone()));
        worker.set_queue(7);
        assert!(worker.configure(raw));
        let mut slot = Some(worker);
        // A request parked on a lookup, then a panic in the next hook.
        let parked = run_or_rebuild(&mut slot, raw, 7, |w| {
            let mut io = w.host().request(1);
            w.on_request(1, &mut io, &[(b":path", b"/"), (b"x-api-key", b"k")])
        });
        assert!(matches!(parked, Ok(Some(Flow::Pause))));
        let slots_before = fake.store.data.borrow().len();
        let panicked = run_or_rebuild(&mut slot, raw, 7, |_| panic!("a bug"));
        assert!(
            panicked.is_err(),
            "the panic is handed back to the hook's guard"
        );
        let worker = slot.as_ref().expect("a worker again");
        assert_eq!(worker.queue(), Some(7));
        assert_eq!(worker.host().stat("panics"), 1);
        let reply = worker
            .host()
            .log_of(1)
            .reply
            .expect("the parked request answered");
        assert_eq!(reply.status, 503);
        assert!(!worker.host().log_of(1).resumed, "never forwarded");
        assert_eq!(
            fake.store.data.borrow().len(),
            slots_before,
            "the node's store kept"
        );
        let served = run_or_rebuild(&mut slot, raw, 7, |w| {
            let mut io = w.host().request(2);
            w.on_request(2, &mut io, &[(b":path", b"/")])
        });
        assert!(matches!(served, Ok(Some(Flow::Pause))));
        assert_eq!(
            slot.as_ref()
                .unwrap()
                .host()
                .log_of(2)
                .reply
                .map(|r| r.status),
            Some(401),
            "the new worker serves"
        );
    }
}
