//! The workers of this thread: one per filter configuration, as the `.wasm` has one per
//! VM. A worker is touched only on its own thread, so no lock is taken on the request
//! path; what other threads tell it waits in its mailbox (`super::mailbox`). The main
//! thread's worker (made with the configuration) serves no request: it keeps the change
//! feed and the node's ticks. A worker thread's is made at its first request.
use super::filter_config::FilterConfig;
use super::host::NativeHost;
use super::mailbox::{CallAnswer, Event, GrpcEnd, Mailbox};
use apikey_core::pipeline::quotas::GrpcOutcome;
use apikey_core::pipeline::rebuild::run_or_rebuild;
use apikey_core::pipeline::worker::Worker;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// One configuration's worker on this thread.
pub struct Local {
    pub node: Arc<FilterConfig>,
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
    fn new(node: &Arc<FilterConfig>, mailbox: Arc<Mailbox>) -> Option<Rc<Local>> {
        // Known to the node first: configuring asks for the worker's tick.
        node.add_mailbox(&mailbox);
        let mut worker = Worker::new(NativeHost::new(node.clone(), mailbox.clone()));
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
    /// then goes on to the hook, whose guard answers for it. `None` without a worker, or
    /// if a hook is already running on it (which cannot happen: what the worker does to a
    /// request waits until it is done, `actions`): nothing then panics.
    pub fn with_worker<T>(&self, f: impl FnOnce(&mut Worker<NativeHost>) -> T) -> Option<T> {
        let Ok(mut slot) = self.worker.try_borrow_mut() else {
            log::error!("apikey-filter: a hook was called inside another; its event is dropped");
            return None;
        };
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

fn deliver(w: &mut Worker<NativeHost>, event: Event) {
    /// Delivers an answer: the host lends its bytes to the worker while `f` runs.
    fn with_answer(
        w: &mut Worker<NativeHost>,
        answer: CallAnswer,
        f: impl FnOnce(&mut Worker<NativeHost>, usize),
    ) {
        let size = answer.body.len();
        w.host().set_answer(answer);
        f(w, size);
        w.host().set_answer(CallAnswer::default());
    }
    match event {
        Event::Message(message) => w.on_message(&message),
        Event::CalloutAnswer(token, answer) => {
            with_answer(w, answer, |w, size| w.on_callout_answer(token, size))
        }
        Event::CalloutRefused(token, why) => w.on_callout_refused(token, why),
        Event::Grpc(token, GrpcEnd::Message(body)) => {
            let answer = CallAnswer {
                body,
                ..CallAnswer::default()
            };
            with_answer(w, answer, |w, size| {
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
pub fn start_main(node: &Arc<FilterConfig>) -> bool {
    let mailbox = Mailbox::for_main(node.main_queue(), node.scheduler());
    let Some(local) = Local::new(node, mailbox) else {
        return false;
    };
    LOCALS.with(|l| l.borrow_mut().push(local));
    true
}

/// Makes this thread's worker for `node`, at its first request here.
pub fn start_thread(node: &Arc<FilterConfig>) -> Option<Rc<Local>> {
    let local = Local::new(
        node,
        Mailbox::for_thread(super::filter_config::next_queue()),
    )?;
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
pub fn existing(node: &FilterConfig) -> Option<Rc<Local>> {
    LOCALS.with(|l| l.borrow().iter().find(|l| l.node.id == node.id).cloned())
}

/// Drops this thread's worker for `node`.
pub fn remove(node: &FilterConfig) {
    let local = LOCALS.with(|l| {
        let mut locals = l.borrow_mut();
        let at = locals.iter().position(|l| l.node.id == node.id)?;
        Some(locals.swap_remove(at))
    });
    if let Some(local) = local {
        local.mailbox.close();
    }
}
