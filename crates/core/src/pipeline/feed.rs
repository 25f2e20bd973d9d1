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
use super::context::{failure_of, Context};
use super::ports::{Host, NotSent};
use super::stats::{Counter, Gauge};
use crate::config::ChangeFeed;
use crate::flights::coordinator::{FeedNews, Message};
use crate::flights::workers;
use crate::keys::feed::{self as changes, is_healthy, poll_path, FeedAnswer, FeedState};
use crate::storage::shared_store::SetError;
use crate::vocabulary::key_hash::KeyHash;

/// The node's feed state in shared data.
const STATE_KEY: &str = "apikey_filter/v1/feed";
/// Compare-and-swap attempts at the feed state before leaving it to the next interval.
const MAX_ATTEMPTS: u32 = 8;

/// The feed desk: the change feed as this worker last saw it, and its poll in flight.
#[derive(Debug, Default)]
pub struct Feed {
    /// The feed's last 200, as far as this worker knows.
    last_ok_ms: u64,
    /// When this worker next looks at the feed state (None: the feed is off).
    next_check_ms: Option<u64>,
    /// When this worker started following the feed (the age of a feed never answered).
    following_since_ms: u64,
    /// This worker's poll in flight: its callout's token (None while it is being sent),
    /// and the cursor it sent.
    poll: Option<Poll>,
}

#[derive(Debug)]
struct Poll {
    token: Option<u32>,
    after: Option<String>,
}

/// The node's feed epoch, when the change feed is on.
pub fn node_epoch<H: Host>(cx: &Context<H>) -> Option<u32> {
    cx.config()?.key_service.changes.as_ref()?;
    Some(read_state(&cx.host).0.epoch)
}

fn feed_config<H: Host>(cx: &Context<H>) -> Option<ChangeFeed> {
    cx.config()?.key_service.changes.clone()
}

fn read_state(host: &impl Host) -> (FeedState, Option<u32>) {
    match host.get(STATE_KEY) {
        Some((value, cas)) => (FeedState::decode(&value).unwrap_or_default(), Some(cas)),
        None => (FeedState::default(), None),
    }
}

/// Changes the node's feed state with compare-and-swap; the state as written (or, when
/// every attempt lost, as last read).
fn update_state(host: &impl Host, change: impl Fn(&mut FeedState)) -> FeedState {
    let mut latest = FeedState::default();
    for _ in 0..MAX_ATTEMPTS {
        let (mut state, cas) = read_state(host);
        change(&mut state);
        latest = state;
        match host.set(STATE_KEY, &latest.encode(), cas) {
            Err(SetError::CasMismatch) => continue,
            _ => break,
        }
    }
    latest
}

impl Feed {
    /// When this worker next looks at the feed state.
    pub fn next_check_ms(&self) -> Option<u64> {
        self.next_check_ms
    }

    /// On configuration: the worker joins the node's list (to be woken with news), makes
    /// sure the feed state exists, and looks at it on its next tick.
    pub fn start_following<H: Host>(cx: &mut Context<H>) -> Feed {
        let mut feed = Feed::default();
        let Some(config) = feed_config(cx) else {
            return feed;
        };
        workers::register(&cx.host, cx.me());
        if cx.host.get(STATE_KEY).is_none() {
            // Both may write when two workers start together: the same empty state.
            let _ = cx.host.set(STATE_KEY, &FeedState::default().encode(), None);
        }
        let now_ms = cx.host.now_ms();
        let (state, _) = read_state(&cx.host);
        feed.follow(
            cx,
            state.epoch,
            state.last_ok_ms,
            now_ms,
            config.interval_ms,
        );
        feed.next_check_ms = Some(now_ms);
        feed.following_since_ms = now_ms;
        feed
    }

    /// Follows the node's feed state, and polls when a poll is due and this worker wins it.
    pub fn on_tick<H: Host>(&mut self, cx: &mut Context<H>, now_ms: u64) {
        let Some(config) = feed_config(cx) else {
            return;
        };
        if self.next_check_ms.is_none_or(|at| at > now_ms) {
            return;
        }
        let (state, cas) = read_state(&cx.host);
        self.follow(
            cx,
            state.epoch,
            state.last_ok_ms,
            now_ms,
            config.interval_ms,
        );
        let since_ms = match self.last_ok_ms {
            0 => self.following_since_ms,
            last_ok_ms => last_ok_ms,
        };
        let age_s = now_ms.saturating_sub(since_ms) / 1000;
        cx.host.set_gauge(Gauge::ChangesAgeS, age_s);
        let mut next_check_ms = state.polled_at_ms.saturating_add(config.interval_ms);
        let polling = self.poll.is_some();
        if state.poll_due(now_ms, config.interval_ms) && !polling && cx.on_duty.is_none() {
            let claimed = FeedState {
                polled_at_ms: now_ms,
                poller: cx.me(),
                ..state.clone()
            };
            // Whoever writes first polls; the others see the new `polled_at_ms`.
            if cx.host.set(STATE_KEY, &claimed.encode(), cas).is_ok() {
                self.poll(cx, state.cursor, &config);
            }
            next_check_ms = now_ms.saturating_add(config.interval_ms);
        }
        self.next_check_ms = Some(next_check_ms.max(now_ms + 1));
    }

    fn poll<H: Host>(&mut self, cx: &mut Context<H>, after: Option<String>, feed: &ChangeFeed) {
        let Some(config) = cx.config().cloned() else {
            return;
        };
        let path = poll_path(&feed.path, after.as_deref());
        self.poll = Some(Poll { token: None, after });
        match cx.send_to_key_service(&config, &path) {
            Ok(token) => {
                if let Some(poll) = &mut self.poll {
                    poll.token = Some(token);
                }
            }
            Err(why) => self.on_answer(cx, FeedAnswer::Failed(not_sent(why))),
        }
    }

    /// Whether `token` is the callout of this worker's poll.
    fn polled_with(&self, token: u32) -> bool {
        self.poll.as_ref().is_some_and(|p| p.token == Some(token))
    }

    /// Callout `token`, if it is this desk's poll, could not be sent after all. False: not
    /// this desk's.
    pub fn on_callout_refused<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        token: u32,
        why: NotSent,
    ) -> bool {
        if !self.polled_with(token) {
            return false;
        }
        self.on_answer(cx, FeedAnswer::Failed(not_sent(why)));
        true
    }

    /// The answer to callout `token`, if it is this desk's poll, is being delivered, with
    /// a body of `body_size`. False: not this desk's.
    pub fn on_callout_answer<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        token: u32,
        body_size: usize,
    ) -> bool {
        if !self.polled_with(token) {
            return false;
        }
        let (status, body) = cx.delivered(body_size, changes::MAX_ANSWER_BYTES);
        self.on_answer(cx, changes::classify(status.as_deref(), body.as_deref()));
        true
    }

    /// The feed answered this worker's poll.
    fn on_answer<H: Host>(&mut self, cx: &mut Context<H>, answer: FeedAnswer) {
        let now_ms = cx.host.now_ms();
        let me = cx.me();
        let (Some(Poll { after, .. }), Some(config)) = (self.poll.take(), feed_config(cx)) else {
            return;
        };
        match answer {
            FeedAnswer::Changes { cursor, key_hashes } => {
                cx.host.count(Counter::ChangesOk);
                let forgotten = match cx.configured.as_mut() {
                    Some(c) => c.cache.forget_all(&cx.host, &key_hashes, now_ms),
                    None => 0,
                };
                if forgotten > 0 {
                    cx.host.count_n(Counter::ChangesForgotten, forgotten as u64);
                }
                let state = update_state(&cx.host, |state| {
                    // A slower poll of an older cursor must not move the feed back.
                    if state.cursor == after {
                        // The node's first cursor (at start, or after a 410) lists nothing
                        // made before it: what the node cached before is forgotten.
                        if after.is_none() {
                            state.epoch = state.epoch.wrapping_add(1);
                        }
                        state.cursor = Some(cursor.clone());
                    }
                    state.last_ok_ms = state.last_ok_ms.max(now_ms);
                });
                self.take_news(cx, &state, key_hashes, now_ms, config.interval_ms);
            }
            FeedAnswer::Gone if after.is_some() => {
                cx.host.count(Counter::ChangesReset);
                log::warn!("change feed: cursor too old (410): the node forgets every cache entry");
                let state = update_state(&cx.host, |state| {
                    if state.cursor == after {
                        state.epoch = state.epoch.wrapping_add(1);
                        state.cursor = None;
                    }
                    state.polled_at_ms = now_ms;
                    state.poller = me;
                });
                self.take_news(cx, &state, Vec::new(), now_ms, config.interval_ms);
                // Ask again at once, without a cursor: where does the feed stand now?
                self.poll(cx, state.cursor, &config);
            }
            // A 410 to a poll without a cursor says nothing: a feed failure, not a reason
            // to forget everything again.
            FeedAnswer::Gone => failed(cx, "answered 410 without a cursor", now_ms),
            FeedAnswer::Failed(why) => failed(cx, &why, now_ms),
        }
        cx.wake_by(now_ms);
    }

    /// This worker's poll moved the node's feed state to `state`: it follows it, and tells
    /// the node's other workers, with the keys the node forgot.
    fn take_news<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        state: &FeedState,
        forgotten: Vec<KeyHash>,
        now_ms: u64,
        interval_ms: u64,
    ) {
        self.follow(cx, state.epoch, state.last_ok_ms, now_ms, interval_ms);
        let news = FeedNews {
            epoch: state.epoch,
            ok_at_ms: state.last_ok_ms,
            forgotten,
        };
        let message = Message::Feed(news).encode();
        for worker in workers::others(&cx.host, cx.me()) {
            // A worker that is gone refuses: nothing to do.
            let _ = cx.host.wake(worker, &message);
        }
    }

    /// Another worker's news of the feed: drop the copies of what it forgot.
    pub fn on_news<H: Host>(&mut self, cx: &mut Context<H>, news: &FeedNews) {
        let Some(config) = feed_config(cx) else {
            return;
        };
        if let Some(c) = cx.configured.as_mut() {
            c.cache.forget_copies(&news.forgotten);
        }
        let now_ms = cx.host.now_ms();
        self.follow(cx, news.epoch, news.ok_at_ms, now_ms, config.interval_ms);
    }

    /// Takes the feed's epoch and health into the trust rules.
    fn follow<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        epoch: u32,
        ok_at_ms: u64,
        now_ms: u64,
        interval_ms: u64,
    ) {
        self.last_ok_ms = self.last_ok_ms.max(ok_at_ms);
        let healthy = is_healthy(self.last_ok_ms, now_ms, interval_ms);
        if let Some(c) = cx.configured.as_mut() {
            c.cache.follow_feed(healthy, epoch);
        }
    }
}

fn failed<H: Host>(cx: &mut Context<H>, why: &str, now_ms: u64) {
    cx.host.count(Counter::ChangesError);
    cx.warnings
        .warn(now_ms, || format!("change feed poll failed: {why}"));
}

fn not_sent(why: NotSent) -> String {
    failure_of(why).describe()
}
