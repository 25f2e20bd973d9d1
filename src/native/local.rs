//! The workers of this thread: one per filter configuration, as the `.wasm` has one per
//! VM. A worker is touched only on its own thread, so no lock is taken on the request
//! path; what other threads tell it waits in its mailbox (`super::mailbox`). The main
//! thread's worker (made with the configuration) serves no request: it keeps the change
//! feed and the node's ticks. A worker thread's is made at its first request.
use super::host::{Answer, NativeHost};
use super::mailbox::{Event, GrpcEnd, Mailbox};
use super::node::Node;
use crate::pipeline::ports::Host;
use crate::pipeline::quotas::GrpcOutcome;
use crate::pipeline::stats::Counter;
use crate::pipeline::worker::Worker;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

/// One configuration's worker on this thread.
pub struct Local {
    pub node: Arc<Node>,
    pub mailbox: Arc<Mailbox>,
    worker: RefCell<Option<Worker<NativeHost>>>,
}

thread_local! {
    /// This thread's workers, one per configuration: a few at most, so a list (every new
    /// stream looks its worker up).
    static LOCALS: RefCell<Vec<Rc<Local>>> = RefCell::default();
}

impl Local {
    /// A worker configured from the node's configuration, with its mailbox; `None` if the
    /// configuration is refused.
    fn new(node: &Arc<Node>, mailbox: Arc<Mailbox>) -> Option<Rc<Local>> {
        // Known to the node first: configuring asks for the worker's tick.
        node.add_mailbox(&mailbox);
        let worker = Worker::new(NativeHost::new(node.clone(), mailbox.clone()));
        worker.set_queue(mailbox.queue);
        if !worker.configure(node.raw_config()) {
            mailbox.close();
            return None;
        }
        Some(Rc::new(Local {
            node: node.clone(),
            mailbox,
            worker: RefCell::new(Some(worker)),
        }))
    }

    /// Runs `f` on the worker. A panic in `f` rebuilds the worker (`run_or_rebuild`),
    /// then goes on to the hook, whose guard answers for it.
    pub fn with_worker<T>(&self, f: impl FnOnce(&Worker<NativeHost>) -> T) -> Option<T> {
        let mut slot = self.worker.borrow_mut();
        let rebuilt = run_or_rebuild(&mut slot, self.node.raw_config(), self.mailbox.queue, f);
        match rebuilt {
            Ok(done) => done,
            Err(panic) => {
                // The hook that panicked did not get to say it was done with its request.
                if let Some(worker) = slot.as_ref() {
                    worker.host().end();
                }
                drop(slot);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Hands the worker what other threads posted: messages, answers, its tick.
    pub fn take_mail(&self) {
        let Some((events, tick)) = self.mailbox.take() else {
            return;
        };
        self.with_worker(|w| {
            for event in events {
                deliver(w, event);
            }
            if tick {
                w.on_tick();
            }
        });
    }
}

fn deliver(w: &Worker<NativeHost>, event: Event) {
    let with_answer = |answer: Answer, f: &dyn Fn(usize)| {
        let size = answer.body.len();
        w.host().set_answer(answer);
        f(size);
        w.host().set_answer(Answer::default());
    };
    match event {
        Event::Message(message) => w.on_message(&message),
        Event::CalloutAnswer(token, answer) => {
            with_answer(answer, &|size| w.on_callout_answer(token, size))
        }
        Event::CalloutRefused(token, why) => w.on_callout_refused(token, why),
        Event::Grpc(token, GrpcEnd::Message(body)) => {
            let answer = Answer {
                body,
                ..Answer::default()
            };
            with_answer(answer, &|size| {
                w.on_grpc_answer(token, GrpcOutcome::Message(size))
            })
        }
        Event::Grpc(token, GrpcEnd::Closed(status)) => {
            w.on_grpc_answer(token, GrpcOutcome::Closed(status))
        }
        Event::Grpc(token, GrpcEnd::NotSent) => w.on_grpc_answer(token, GrpcOutcome::NotSent),
    }
}

/// Makes the main thread's worker for a new configuration; false if it is refused.
pub fn start_main(node: &Arc<Node>) -> bool {
    let mailbox = Mailbox::for_main(node.main_queue(), node.scheduler());
    let Some(local) = Local::new(node, mailbox) else {
        return false;
    };
    LOCALS.with(|l| l.borrow_mut().push(local));
    true
}

/// Makes this thread's worker for `node`, at its first request here.
pub fn start_thread(node: &Arc<Node>) -> Option<Rc<Local>> {
    let local = Local::new(node, Mailbox::for_thread(super::node::next_queue()))?;
    // The main thread's worker runs when this thread is idle: it keeps the node's duties.
    local.with_worker(|w| w.set_on_duty(Some(node.main_queue())));
    LOCALS.with(|l| {
        let mut locals = l.borrow_mut();
        // The workers of configurations destroyed since go with this thread's next new one.
        locals.retain(|local| !local.node.is_destroyed());
        locals.push(local.clone());
    });
    Some(local)
}

/// This thread's worker for `node`, if it has one yet (the main thread's, on the main
/// thread).
pub fn existing(node: &Node) -> Option<Rc<Local>> {
    LOCALS.with(|l| l.borrow().iter().find(|l| l.node.id == node.id).cloned())
}

/// Drops this thread's worker for `node`.
pub fn remove(node: &Node) {
    let local = LOCALS.with(|l| {
        let mut locals = l.borrow_mut();
        let at = locals.iter().position(|l| l.node.id == node.id)?;
        Some(locals.swap_remove(at))
    });
    if let Some(local) = local {
        local.mailbox.close();
    }
}

/// Runs `f` on the worker in `slot`. If `f` panics, the worker's state is in doubt: it is
/// abandoned (the requests it holds are refused, never forwarded), the `panics` counter
/// moves, and a worker configured anew from `raw_config` takes its place, over the same
/// host and so the same node-wide store. The panic is handed back.
pub fn run_or_rebuild<H: Host, T>(
    slot: &mut Option<Worker<H>>,
    raw_config: &[u8],
    queue: u32,
    f: impl FnOnce(&Worker<H>) -> T,
) -> Result<Option<T>, Box<dyn std::any::Any + Send>> {
    let Some(worker) = slot.as_ref() else {
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
        let worker = Worker::new(host);
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
    use crate::pipeline::fake::{FakeHost, Node as FakeNode};
    use crate::pipeline::worker::Flow;

    #[test]
    fn a_panic_rebuilds_the_worker_refuses_what_it_held_and_keeps_the_node_store() {
        let raw = br#"{"key_service": {"cluster": "keys"}, "rate_limit": {"requests": 5, "period_s": 60}}"#;
        let fake = Rc::new(FakeNode::default());
        let worker = Worker::new(FakeHost::new(fake.clone()));
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
