//! A worker's flights: callouts it makes or waits for on the node's behalf, each with the
//! requests parked on it (none for work in the background), its node-wide lease, and when
//! to stop waiting for another worker's.
//!
//! A flight is queued when it is asked for, then either sent by this worker (it holds
//! the lease, or the lease table could not be used) or waits for another worker's callout
//! until woken or until the lease's deadline, when this worker takes it over. It lands
//! when its answer is in: the lease is released and the workers that waited are named,
//! to be woken.
use crate::flights::lease::{self, Acquired, FlightEnd};
use crate::storage::shared_store::SharedStore;
use crate::vocabulary::key_hash::KeyHash;
use std::collections::HashMap;

/// What a worker's queue carries: a lookup one of its own requests asks for, another
/// worker's news of a lookup this one waited for, or the change feed's news from the
/// worker that polled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ask(KeyHash),
    Woken(FlightEnd, KeyHash),
    Feed(FeedNews),
    /// The node admitted requests of this key that are not reported yet: for the worker
    /// on duty, from one that leaves it the reports.
    Unreported(KeyHash),
}

/// What a feed poll found, for the node's other workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedNews {
    pub epoch: u32,
    /// When the feed last answered 200.
    pub ok_at_ms: u64,
    /// Keys whose copies must go.
    pub forgotten: Vec<KeyHash>,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, key_hash) = match self {
            Message::Ask(h) => (0, h),
            Message::Woken(FlightEnd::Answered, h) => (1, h),
            Message::Woken(FlightEnd::Failed, h) => (2, h),
            Message::Woken(FlightEnd::Overloaded, h) => (4, h),
            Message::Unreported(h) => (5, h),
            Message::Feed(news) => {
                let mut out = Vec::with_capacity(13 + 32 * news.forgotten.len());
                out.push(3);
                out.extend_from_slice(&news.epoch.to_le_bytes());
                out.extend_from_slice(&news.ok_at_ms.to_le_bytes());
                news.forgotten.iter().for_each(|h| out.extend_from_slice(h));
                return out;
            }
        };
        let mut out = Vec::with_capacity(33);
        out.push(kind);
        out.extend_from_slice(key_hash);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Message> {
        let (&kind, rest) = bytes.split_first()?;
        if kind == 3 {
            let (head, hashes) = (rest.get(..12)?, rest.get(12..)?);
            if hashes.len() % 32 != 0 {
                return None;
            }
            return Some(Message::Feed(FeedNews {
                epoch: u32::from_le_bytes(head.get(..4)?.try_into().ok()?),
                ok_at_ms: u64::from_le_bytes(head.get(4..)?.try_into().ok()?),
                forgotten: hashes
                    .chunks_exact(32)
                    .filter_map(|h| h.try_into().ok())
                    .collect(),
            }));
        }
        let key_hash: KeyHash = rest.try_into().ok()?;
        match kind {
            0 => Some(Message::Ask(key_hash)),
            1 => Some(Message::Woken(FlightEnd::Answered, key_hash)),
            2 => Some(Message::Woken(FlightEnd::Failed, key_hash)),
            4 => Some(Message::Woken(FlightEnd::Overloaded, key_hash)),
            5 => Some(Message::Unreported(key_hash)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Asked for, not started yet.
    Queued,
    /// This worker's callout is out.
    Sent { at_ms: u64, holds_lease: bool },
    /// Another worker's callout is out; take over at `deadline_ms` unless woken first.
    WaitingOnPeer { deadline_ms: u64 },
}

#[derive(Debug)]
pub struct Flight<P> {
    /// Requests (context ids) to answer when it lands.
    pub parked: Vec<u32>,
    /// What the flight's owner keeps with it (for a lookup: the stale record).
    pub payload: P,
    state: State,
}

impl<P> Flight<P> {
    /// When this worker's callout went out.
    pub fn sent_at_ms(&self) -> Option<u64> {
        match self.state {
            State::Sent { at_ms, .. } => Some(at_ms),
            _ => None,
        }
    }
}

/// How `start` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Send the callout now, then call `sent`.
    Send,
    /// Another worker is making it.
    Wait,
    /// A flight for the same thing landed moments ago with a verdict: read the store.
    AlreadyAnswered,
    /// Nothing to start: no such flight, or it is under way.
    Nothing,
}

pub struct Flights<P> {
    flights: HashMap<KeyHash, Flight<P>>,
    tokens: HashMap<u32, KeyHash>,
}

impl<P> Default for Flights<P> {
    fn default() -> Self {
        Flights {
            flights: HashMap::new(),
            tokens: HashMap::new(),
        }
    }
}

impl<P> Flights<P> {
    /// Parks request `parked` (if any) on the flight for `key`, queuing a new flight
    /// (with `payload()`) when there is none. True when the flight is new: it must be
    /// started.
    pub fn join(&mut self, key: KeyHash, parked: Option<u32>, payload: impl FnOnce() -> P) -> bool {
        if let Some(flight) = self.flights.get_mut(&key) {
            flight.parked.extend(parked);
            return false;
        }
        let flight = Flight {
            parked: parked.into_iter().collect(),
            payload: payload(),
            state: State::Queued,
        };
        self.flights.insert(key, flight);
        true
    }

    /// Starts a queued flight: takes its node-wide lease for `hold_ms` (worker `me`,
    /// named by its queue) or joins the worker that holds it. With `trust_recent_answer`,
    /// a flight for the same thing that landed moments ago is `AlreadyAnswered`.
    pub fn start(
        &mut self,
        store: &impl SharedStore,
        key: KeyHash,
        me: u32,
        now_ms: u64,
        hold_ms: u64,
        trust_recent_answer: bool,
    ) -> Start {
        let Some(flight) = self.flights.get_mut(&key) else {
            return Start::Nothing;
        };
        if flight.state != State::Queued {
            return Start::Nothing;
        }
        match lease::acquire(store, &key, me, now_ms, hold_ms, trust_recent_answer) {
            Acquired::Owner => {
                flight.state = sent(now_ms, true);
                Start::Send
            }
            Acquired::Bypass => {
                flight.state = sent(now_ms, false);
                Start::Send
            }
            Acquired::Waiting { deadline_ms } => {
                flight.state = State::WaitingOnPeer { deadline_ms };
                Start::Wait
            }
            Acquired::Answered => Start::AlreadyAnswered,
        }
    }

    /// The callout of `key`'s flight went out as `token`.
    pub fn sent(&mut self, key: KeyHash, token: u32) {
        if self.flights.contains_key(&key) {
            self.tokens.insert(token, key);
        }
    }

    /// The flight whose callout `token` answered, if it is still under way.
    pub fn answered(&mut self, token: u32) -> Option<KeyHash> {
        self.tokens.remove(&token)
    }

    /// Queues `key`'s flight again, to be started anew (its peer's answer was not where
    /// it should be).
    pub fn requeue(&mut self, key: KeyHash) {
        if let Some(flight) = self.flights.get_mut(&key) {
            flight.state = State::Queued;
        }
    }

    /// Whether the flight is asked for and not started yet.
    pub fn is_queued(&self, key: &KeyHash) -> bool {
        self.flights
            .get(key)
            .is_some_and(|f| f.state == State::Queued)
    }

    /// Whether the flight is waiting for another worker's callout.
    pub fn is_waiting_on_peer(&self, key: &KeyHash) -> bool {
        self.flights
            .get(key)
            .is_some_and(|f| matches!(f.state, State::WaitingOnPeer { .. }))
    }

    pub fn get(&self, key: &KeyHash) -> Option<&Flight<P>> {
        self.flights.get(key)
    }

    pub fn get_mut(&mut self, key: &KeyHash) -> Option<&mut Flight<P>> {
        self.flights.get_mut(key)
    }

    /// Ends `key`'s flight as `ended`: releases its lease if this worker holds it.
    /// Returns the flight, and the queues of the workers that waited for it.
    pub fn land(
        &mut self,
        store: &impl SharedStore,
        key: KeyHash,
        me: u32,
        ended: FlightEnd,
        now_ms: u64,
    ) -> Option<(Flight<P>, Vec<u32>)> {
        let flight = self.flights.remove(&key)?;
        let peers = match flight.state {
            State::Sent {
                holds_lease: true, ..
            } => lease::release(store, &key, me, ended, now_ms),
            _ => Vec::new(),
        };
        Some((flight, peers))
    }

    /// Flights whose peer went silent past its lease's deadline, queued again to be
    /// started (and so taken over) by this worker.
    pub fn take_over_overdue(&mut self, now_ms: u64) -> Vec<KeyHash> {
        let mut overdue = Vec::new();
        for (key, flight) in &mut self.flights {
            if let State::WaitingOnPeer { deadline_ms } = flight.state {
                if deadline_ms <= now_ms {
                    flight.state = State::Queued;
                    overdue.push(*key);
                }
            }
        }
        overdue
    }

    /// The earliest moment something must happen without being woken: a takeover.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.flights
            .values()
            .filter_map(|f| match f.state {
                State::WaitingOnPeer { deadline_ms } => Some(deadline_ms),
                _ => None,
            })
            .min()
    }
}

fn sent(at_ms: u64, holds_lease: bool) -> State {
    State::Sent { at_ms, holds_lease }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::shared_store::fake::FakeStore;
    use crate::storage::slots::{create_slots, Table};

    const KEY: KeyHash = [5; 32];

    fn store() -> FakeStore {
        let s = FakeStore::default();
        create_slots(&s, Table::leases());
        s
    }

    #[test]
    fn requests_for_one_key_share_one_flight() {
        let mut flights: Flights<&str> = Flights::default();
        assert!(flights.join(KEY, Some(1), || "first"));
        assert!(!flights.join(KEY, Some(2), || "second"));
        assert!(!flights.join(KEY, None, || "third"));
        let flight = flights.get(&KEY).unwrap();
        assert_eq!(
            (flight.parked.clone(), flight.payload),
            (vec![1, 2], "first")
        );
    }

    #[test]
    fn one_worker_sends_another_waits_and_is_named_when_it_lands() {
        let s = store();
        let (mut mine, mut theirs): (Flights<()>, Flights<()>) = Default::default();
        mine.join(KEY, Some(1), || ());
        theirs.join(KEY, None, || ());
        assert_eq!(mine.start(&s, KEY, 10, 1_000, 1_500, true), Start::Send);
        assert_eq!(
            mine.start(&s, KEY, 10, 1_000, 1_500, true),
            Start::Nothing,
            "under way"
        );
        mine.sent(KEY, 77);
        assert_eq!(theirs.start(&s, KEY, 20, 1_001, 1_500, true), Start::Wait);
        assert!(theirs.is_waiting_on_peer(&KEY));
        assert_eq!(theirs.next_deadline_ms(), Some(2_500));
        assert_eq!(mine.answered(77), Some(KEY));
        assert_eq!(mine.answered(77), None, "one answer per token");
        let (flight, peers) = mine.land(&s, KEY, 10, FlightEnd::Answered, 1_100).unwrap();
        assert_eq!(
            (flight.sent_at_ms(), flight.parked, peers),
            (Some(1_000), vec![1], vec![20])
        );
        assert!(mine.get(&KEY).is_none());
    }

    #[test]
    fn a_silent_peer_is_taken_over_at_its_deadline() {
        let s = store();
        let (mut gone, mut mine): (Flights<()>, Flights<()>) = Default::default();
        gone.join(KEY, None, || ());
        assert_eq!(gone.start(&s, KEY, 10, 0, 1_500, true), Start::Send);
        mine.join(KEY, Some(3), || ());
        assert_eq!(mine.start(&s, KEY, 20, 100, 1_500, true), Start::Wait);
        assert_eq!(mine.take_over_overdue(1_499), Vec::<KeyHash>::new());
        assert_eq!(mine.take_over_overdue(1_500), vec![KEY]);
        assert_eq!(mine.next_deadline_ms(), None);
        assert_eq!(mine.start(&s, KEY, 20, 1_500, 1_500, true), Start::Send);
        let (flight, peers) = mine.land(&s, KEY, 20, FlightEnd::Failed, 1_600).unwrap();
        assert_eq!((flight.parked, peers), (vec![3], vec![]));
        assert_eq!(
            gone.land(&s, KEY, 10, FlightEnd::Answered, 1_700)
                .unwrap()
                .1,
            Vec::<u32>::new(),
            "the old owner's lease was taken: it wakes nobody"
        );
    }

    #[test]
    fn a_flight_without_parked_requests_works_the_same() {
        let s = store();
        let mut flights: Flights<u8> = Flights::default();
        assert!(flights.join(KEY, None, || 7));
        assert_eq!(flights.start(&s, KEY, 1, 0, 1_000, true), Start::Send);
        flights.sent(KEY, 5);
        assert_eq!(flights.answered(5), Some(KEY));
        let (flight, _) = flights.land(&s, KEY, 1, FlightEnd::Answered, 10).unwrap();
        assert_eq!((flight.parked.len(), flight.payload), (0, 7));
        assert!(flights.join(KEY, None, || 8));
        assert_eq!(
            flights.start(&s, KEY, 1, 20, 1_000, true),
            Start::AlreadyAnswered,
            "landed with a verdict moments ago"
        );
        assert_eq!(flights.start(&s, KEY, 1, 20, 1_000, false), Start::Send);
    }

    #[test]
    fn messages_round_trip() {
        for message in [
            Message::Ask([5; 32]),
            Message::Woken(FlightEnd::Answered, [5; 32]),
            Message::Woken(FlightEnd::Failed, [5; 32]),
            Message::Woken(FlightEnd::Overloaded, [5; 32]),
            Message::Feed(FeedNews::default()),
            Message::Feed(FeedNews {
                epoch: 3,
                ok_at_ms: 1_234,
                forgotten: vec![[1; 32], [2; 32]],
            }),
        ] {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(&[5; 32]), None);
        assert_eq!(Message::decode(&[9; 33]), None);
        assert_eq!(Message::decode(&[3; 20]), None, "news with part of a hash");
        assert_eq!(Message::decode(&[]), None);
    }
}
