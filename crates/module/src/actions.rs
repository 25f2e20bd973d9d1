//! What the worker does to a request, recorded to be carried out once the worker is
//! done: Envoy's header getters lend bytes that a
//! header change may free, and a local reply runs the response hooks at once.
//!
//! The request a hook is handling records into its thread's log (`with_current`), reused
//! from one request to the next; a parked request, into its own (`Parked`), and its
//! scheduler runs its hook to carry them out.
use super::abi::{self, EnvoyPtr};
use std::cell::{Cell, RefCell, RefMut};
use std::ops::Range;

/// The filter state the access log reads a refused key's fingerprint from, as
/// `%FILTER_STATE(apikey_filter.fingerprint:PLAIN)%`.
pub const FINGERPRINT_STATE: &str = "apikey_filter.fingerprint";

enum Entry {
    /// Sets a request header (`None`: removes it); `add` when the request did not carry
    /// it (adding costs Envoy half of replacing).
    SetHeader {
        name: Range<usize>,
        value: Option<Range<usize>>,
        add: bool,
    },
    AddResponseHeader {
        name: Range<usize>,
        value: Range<usize>,
    },
    FilterState(Range<usize>),
    Reply {
        status: u32,
        body: Range<usize>,
        headers: Vec<(Range<usize>, Range<usize>)>,
    },
    Resume,
}

/// A request's actions in order, their bytes in one buffer.
#[derive(Default)]
pub struct ActionLog {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl ActionLog {
    fn keep(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    fn bytes(&self, range: &Range<usize>) -> &[u8] {
        self.bytes.get(range.clone()).unwrap_or_default()
    }

    pub fn set_header(&mut self, name: &str, value: Option<&[u8]>) {
        let name = self.keep(name.as_bytes());
        let value = value.map(|v| self.keep(v));
        self.entries.push(Entry::SetHeader {
            name,
            value,
            add: false,
        });
    }

    pub fn add_response_header(&mut self, name: &str, value: &str) {
        let (name, value) = (self.keep(name.as_bytes()), self.keep(value.as_bytes()));
        self.entries.push(Entry::AddResponseHeader { name, value });
    }

    pub fn filter_state(&mut self, value: &str) {
        let value = self.keep(value.as_bytes());
        self.entries.push(Entry::FilterState(value));
    }

    pub fn reply(&mut self, status: u32, body: &str, headers: &[(&str, &str)]) {
        let body = self.keep(body.as_bytes());
        let headers = headers
            .iter()
            .map(|(n, v)| (self.keep(n.as_bytes()), self.keep(v.as_bytes())))
            .collect();
        self.entries.push(Entry::Reply {
            status,
            body,
            headers,
        });
    }

    pub fn resume(&mut self) {
        self.entries.push(Entry::Resume);
    }

    /// Whether the request is answered or let go already.
    pub fn has_ending(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, Entry::Reply { .. } | Entry::Resume))
    }

    /// Marks the request headers to set that the request does not carry (`carries`
    /// answers from its original headers) as added rather than replaced.
    pub fn add_where_absent(&mut self, carries: impl Fn(&[u8]) -> bool) {
        for entry in &mut self.entries {
            if let Entry::SetHeader {
                name,
                value: Some(_),
                add,
            } = entry
            {
                *add = !carries(self.bytes.get(name.clone()).unwrap_or_default());
            }
        }
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    /// Carries the actions out, in order. What ended the request's part here: a reply
    /// sent, or the request let go on.
    ///
    /// # Safety
    /// `filter` is the live stream the actions belong to, on its own thread.
    pub unsafe fn carry_out(&self, filter: EnvoyPtr) -> Ending {
        let mut ended = Ending::No;
        for entry in &self.entries {
            // SAFETY: the caller's promise.
            unsafe {
                match entry {
                    Entry::SetHeader {
                        name,
                        value: Some(value),
                        add: true,
                    } => abi::add_header(
                        filter,
                        abi::REQUEST_HEADER,
                        self.bytes(name),
                        self.bytes(value),
                    ),
                    Entry::SetHeader { name, value, .. } => abi::set_header(
                        filter,
                        abi::REQUEST_HEADER,
                        self.bytes(name),
                        value.as_ref().map(|v| self.bytes(v)),
                    ),
                    Entry::AddResponseHeader { name, value } => abi::add_header(
                        filter,
                        abi::RESPONSE_HEADER,
                        self.bytes(name),
                        self.bytes(value),
                    ),
                    Entry::FilterState(value) => {
                        abi::set_filter_state(filter, FINGERPRINT_STATE, self.bytes(value))
                    }
                    Entry::Reply {
                        status,
                        body,
                        headers,
                    } => {
                        let headers: Vec<(&[u8], &[u8])> = headers
                            .iter()
                            .map(|(n, v)| (self.bytes(n), self.bytes(v)))
                            .collect();
                        abi::send_response(filter, *status, &headers, self.bytes(body));
                        ended = Ending::Replied;
                    }
                    Entry::Resume => ended = Ending::Resumed,
                }
            }
        }
        ended
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    No,
    Replied,
    Resumed,
}

thread_local! {
    static CURRENT: RefCell<ActionLog> = RefCell::default();
}

/// The log of the request this thread's hook is handling.
pub fn with_current<T>(f: impl FnOnce(&mut ActionLog) -> T) -> T {
    CURRENT.with(|log| f(&mut log.borrow_mut()))
}

/// Takes the current request's actions, carries them out and keeps the emptied log for
/// the next request. Taken out first: a local reply runs the response hooks, which
/// record into the log too.
///
/// # Safety
/// `filter` is the live stream whose hook is running, on its thread.
pub unsafe fn carry_out_current(filter: EnvoyPtr) -> Ending {
    let mut log = CURRENT.with(|log| std::mem::take(&mut *log.borrow_mut()));
    // SAFETY: the caller's promise.
    let ended = unsafe { log.carry_out(filter) };
    log.clear();
    CURRENT.with(|current| {
        if current.borrow().entries.is_empty() {
            *current.borrow_mut() = log;
        }
    });
    ended
}

/// A parked request's actions, and the scheduler that runs its hook to carry them out.
/// Only its own thread touches it (its worker is that thread's).
pub struct Parked {
    log: RefCell<ActionLog>,
    scheduler: Cell<EnvoyPtr>,
    /// The client's address, read when the request parked: the worker may need it when
    /// it acts on the request later, outside the request's hooks.
    pub client_address: Option<Vec<u8>>,
}

impl Parked {
    pub fn new(scheduler: EnvoyPtr, client_address: Option<Vec<u8>>) -> Parked {
        Parked {
            log: RefCell::default(),
            scheduler: Cell::new(scheduler),
            client_address,
        }
    }

    pub fn log(&self) -> RefMut<'_, ActionLog> {
        self.log.borrow_mut()
    }

    pub fn scheduler(&self) -> EnvoyPtr {
        self.scheduler.get()
    }

    /// The scheduler, taken out (null from then on) to be deleted.
    pub fn take_scheduler(&self) -> EnvoyPtr {
        self.scheduler.replace(std::ptr::null_mut())
    }

    /// Carries out what the worker did meanwhile.
    ///
    /// # Safety
    /// `filter` is the live stream these are for, on its thread.
    pub unsafe fn carry_out(&self, filter: EnvoyPtr) -> Ending {
        let log = std::mem::take(&mut *self.log());
        // SAFETY: the caller's promise.
        unsafe { log.carry_out(filter) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_the_request_did_not_carry_are_added_the_others_replaced() {
        let mut log = ActionLog::default();
        log.set_header("x-api-key", None);
        log.set_header("x-api-key-id", Some(b"k_alice"));
        log.set_header("x-api-key-owner", Some(b"acme"));
        log.add_where_absent(|name| name == b"x-api-key-owner" || name == b"x-api-key");
        let marks: Vec<(&[u8], bool)> = log
            .entries
            .iter()
            .map(|e| match e {
                Entry::SetHeader { name, add, .. } => (log.bytes(name), *add),
                _ => panic!("only header edits"),
            })
            .collect();
        assert_eq!(
            marks,
            [
                (&b"x-api-key"[..], false),
                (&b"x-api-key-id"[..], true),
                (&b"x-api-key-owner"[..], false),
            ]
        );
        assert!(!log.has_ending());
    }

    #[test]
    fn a_reply_or_a_resume_ends_the_request_and_keeps_its_bytes() {
        let mut log = ActionLog::default();
        log.filter_state("3b1f0c9a27de");
        assert!(!log.has_ending());
        log.reply(401, "{}", &[("www-authenticate", "ApiKey")]);
        assert!(log.has_ending());
        let Some(Entry::Reply { body, headers, .. }) = log.entries.last() else {
            panic!("a reply");
        };
        assert_eq!(log.bytes(body), b"{}");
        let (name, value) = &headers[0];
        assert_eq!(
            (log.bytes(name), log.bytes(value)),
            (&b"www-authenticate"[..], &b"ApiKey"[..])
        );
        let mut resumed = ActionLog::default();
        resumed.resume();
        assert!(resumed.has_ending());
    }
}
