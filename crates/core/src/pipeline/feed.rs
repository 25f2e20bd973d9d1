//! The key service's change feed, worker by worker: once per interval, whichever worker's
//! tick finds a poll due wins the node's feed state (compare-and-swap) and polls; it makes
//! the node forget the keys the feed lists (tombstones in shared data), writes where the
//! feed stands, and wakes the node's other workers with the news, so that each drops its
//! own copies at once. A `410` moves the node's epoch on: every entry stored before it is
//! then forgotten, and the next poll starts again without a cursor.
//!
//! Whether the feed is healthy (a 200 younger than three intervals) decides how long
//! found keys are trusted; each worker follows it from the feed state on its tick and from
//! the news, off the request path.
use super::ports::Host;
use super::stats::{Counter, Gauge};
use super::worker::{Payload, Worker};
use crate::config::ChangeFeed;
use crate::flights::coordinator::{FeedNews, FlightKey, Message};
use crate::flights::lease::FlightEnd;
use crate::flights::workers;
use crate::keys::feed::{is_healthy, poll_path, FeedAnswer, FeedState};
use crate::storage::shared_store::SetError;

/// The node's feed state in shared data.
const STATE_KEY: &str = "apikey_filter/v1/feed";
/// Compare-and-swap attempts at the feed state before leaving it to the next interval.
const MAX_ATTEMPTS: u32 = 8;

/// The feed as one worker last saw it.
#[derive(Debug, Default)]
pub struct FeedView {
    /// The feed's last 200, as far as this worker knows.
    pub last_ok_ms: u64,
    /// When this worker next looks at the feed state (None: the feed is off).
    pub next_check_ms: Option<u64>,
    /// When this worker started following the feed (the age of a feed never answered).
    pub following_since_ms: u64,
}

impl<H: Host> Worker<H> {
    fn feed_config(&self) -> Option<ChangeFeed> {
        self.config()?.key_service.changes.clone()
    }

    /// On configuration: the worker joins the node's list (to be woken with news), makes
    /// sure the feed state exists, and looks at it on its next tick.
    pub(super) fn start_following_feed(&self) {
        let me = self.queue.get().unwrap_or_default();
        workers::register(&self.host, me);
        if self.host.get(STATE_KEY).is_none() {
            // Both may write when two workers start together: the same empty state.
            let _ = self
                .host
                .set(STATE_KEY, &FeedState::default().encode(), None);
        }
        let now_ms = self.host.now_ms();
        if let Some(feed) = self.feed_config() {
            let (state, _) = self.read_state();
            self.follow(state.epoch, state.last_ok_ms, now_ms, feed.interval_ms);
        }
        let mut view = self.feed.borrow_mut();
        view.next_check_ms = Some(now_ms);
        view.following_since_ms = now_ms;
    }

    /// Follows the node's feed state, and polls when a poll is due and this worker wins it.
    pub(super) fn on_feed_tick(&self, now_ms: u64) {
        let Some(feed) = self.feed_config() else {
            return;
        };
        if self
            .feed
            .borrow()
            .next_check_ms
            .is_none_or(|at| at > now_ms)
        {
            return;
        }
        let (state, cas) = self.read_state();
        self.follow(state.epoch, state.last_ok_ms, now_ms, feed.interval_ms);
        let since_ms = match self.feed.borrow().last_ok_ms {
            0 => self.feed.borrow().following_since_ms,
            last_ok_ms => last_ok_ms,
        };
        let age_s = now_ms.saturating_sub(since_ms) / 1000;
        self.host.set_gauge(Gauge::ChangesAgeS, age_s);
        let polling = self.flights.borrow().get(&FlightKey::FeedPoll).is_some();
        let mut next_check_ms = state.polled_at_ms.saturating_add(feed.interval_ms);
        if state.poll_due(now_ms, feed.interval_ms) && !polling && self.on_duty.get().is_none() {
            let me = self.queue.get().unwrap_or_default();
            let claimed = FeedState {
                polled_at_ms: now_ms,
                poller: me,
                ..state.clone()
            };
            // Whoever writes first polls; the others see the new `polled_at_ms`.
            if self.host.set(STATE_KEY, &claimed.encode(), cas).is_ok() {
                self.poll(state.cursor, &feed);
            }
            next_check_ms = now_ms.saturating_add(feed.interval_ms);
        }
        self.feed.borrow_mut().next_check_ms = Some(next_check_ms.max(now_ms + 1));
    }

    /// The node's feed epoch, when the change feed is on.
    pub(super) fn node_feed_epoch(&self) -> Option<u32> {
        self.config()?.key_service.changes.as_ref()?;
        Some(self.read_state().0.epoch)
    }

    fn read_state(&self) -> (FeedState, Option<u32>) {
        match self.host.get(STATE_KEY) {
            Some((value, cas)) => (FeedState::decode(&value).unwrap_or_default(), Some(cas)),
            None => (FeedState::default(), None),
        }
    }

    fn poll(&self, after: Option<String>, feed: &ChangeFeed) {
        let Some(config) = self.config() else {
            return;
        };
        let path = poll_path(&feed.path, after.as_deref());
        let key = FlightKey::FeedPoll;
        let mut flights = self.flights.borrow_mut();
        flights.join(key, None, || Payload::Poll { after });
        let started = flights.start_unleased(key, self.host.now_ms());
        drop(flights);
        if started {
            self.send_callout(key, &path, &config);
        }
    }

    /// The feed answered this worker's poll.
    pub(super) fn on_poll_answer(&self, answer: FeedAnswer) {
        let now_ms = self.host.now_ms();
        let me = self.queue.get().unwrap_or_default();
        let landed = self.flights.borrow_mut().land(
            &self.host,
            FlightKey::FeedPoll,
            me,
            FlightEnd::Answered,
            now_ms,
        );
        let (Some((flight, _)), Some(feed)) = (landed, self.feed_config()) else {
            return;
        };
        let Payload::Poll { after } = flight.payload else {
            return;
        };
        match answer {
            FeedAnswer::Changes { cursor, key_hashes } => {
                self.host.count(Counter::ChangesOk);
                let forgotten = match self.cache.borrow_mut().as_mut() {
                    Some(cache) => cache.forget_all(&self.host, &key_hashes, now_ms),
                    None => 0,
                };
                if forgotten > 0 {
                    self.host
                        .count_n(Counter::ChangesForgotten, forgotten as u64);
                }
                let state = self.update_state(|state| {
                    // A slower poll of an older cursor must not move the feed back.
                    if state.cursor == after {
                        state.cursor = Some(cursor.clone());
                    }
                    state.last_ok_ms = state.last_ok_ms.max(now_ms);
                });
                self.follow(state.epoch, state.last_ok_ms, now_ms, feed.interval_ms);
                self.tell_others(FeedNews {
                    epoch: state.epoch,
                    ok_at_ms: state.last_ok_ms,
                    forgotten: key_hashes,
                });
            }
            FeedAnswer::Gone if after.is_some() => {
                self.host.count(Counter::ChangesReset);
                log::warn!("change feed: cursor too old (410): the node forgets every cache entry");
                let state = self.update_state(|state| {
                    if state.cursor == after {
                        state.epoch = state.epoch.wrapping_add(1);
                        state.cursor = None;
                    }
                    state.polled_at_ms = now_ms;
                    state.poller = me;
                });
                self.follow(state.epoch, state.last_ok_ms, now_ms, feed.interval_ms);
                self.tell_others(FeedNews {
                    epoch: state.epoch,
                    ok_at_ms: state.last_ok_ms,
                    forgotten: Vec::new(),
                });
                // Ask again at once, without a cursor: where does the feed stand now?
                self.poll(state.cursor, &feed);
            }
            // A 410 to a poll without a cursor says nothing: a feed failure, not a reason
            // to forget everything again.
            FeedAnswer::Gone => self.on_poll_answer_failed("answered 410 without a cursor", now_ms),
            FeedAnswer::Failed(why) => self.on_poll_answer_failed(&why, now_ms),
        }
        self.reschedule(now_ms);
    }

    fn on_poll_answer_failed(&self, why: &str, now_ms: u64) {
        self.host.count(Counter::ChangesError);
        self.warnings
            .warn(now_ms, || format!("change feed poll failed: {why}"));
    }

    /// Changes the node's feed state with compare-and-swap; the state as written (or, when
    /// every attempt lost, as last read).
    fn update_state(&self, change: impl Fn(&mut FeedState)) -> FeedState {
        let mut latest = FeedState::default();
        for _ in 0..MAX_ATTEMPTS {
            let (mut state, cas) = self.read_state();
            change(&mut state);
            latest = state;
            match self.host.set(STATE_KEY, &latest.encode(), cas) {
                Err(SetError::CasMismatch) => continue,
                _ => break,
            }
        }
        latest
    }

    fn tell_others(&self, news: FeedNews) {
        let me = self.queue.get().unwrap_or_default();
        let message = Message::Feed(news).encode();
        for worker in workers::others(&self.host, me) {
            // A worker that is gone refuses: nothing to do.
            let _ = self.host.wake(worker, &message);
        }
    }

    /// Another worker's news of the feed: drop the copies of what it forgot.
    pub(super) fn on_feed_news(&self, news: &FeedNews) {
        let Some(feed) = self.feed_config() else {
            return;
        };
        if let Some(cache) = self.cache.borrow_mut().as_mut() {
            cache.forget_copies(&news.forgotten);
        }
        let now_ms = self.host.now_ms();
        self.follow(news.epoch, news.ok_at_ms, now_ms, feed.interval_ms);
    }

    /// Takes the feed's epoch and health into the trust rules.
    fn follow(&self, epoch: u32, ok_at_ms: u64, now_ms: u64, interval_ms: u64) {
        let mut view = self.feed.borrow_mut();
        view.last_ok_ms = view.last_ok_ms.max(ok_at_ms);
        let healthy = is_healthy(view.last_ok_ms, now_ms, interval_ms);
        if let Some(cache) = self.cache.borrow_mut().as_mut() {
            cache.follow_feed(healthy, epoch);
        }
    }
}
