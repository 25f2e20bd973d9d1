//! The key service's change feed (CONTRACT "Change feed"): what an answer says, and the
//! node-wide state of the feed in shared data (where it stands, when it last answered,
//! who polls, and the cache's epoch, which a `410` moves on so that every entry stored
//! before it is forgotten at once).
use crate::keys::answer::status_code;
use crate::vocabulary::form::form_encode;
use crate::vocabulary::json_fields::Object;
use crate::vocabulary::key_hash::KeyHash;
use serde_json::Value;

/// Larger answers are refused rather than copied in: a feed that changed more keys than
/// fit (about 7,800 hashes) in one interval should answer 410 instead.
pub const MAX_ANSWER_BYTES: usize = 512 * 1024;
/// The feed is healthy while its last 200 is younger than this many intervals.
pub const HEALTHY_INTERVALS: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedAnswer {
    /// Where the feed stands now, and the keys that changed after the cursor sent.
    Changes {
        cursor: String,
        key_hashes: Vec<KeyHash>,
    },
    /// `410`: the cursor is too old; forget everything and start again.
    Gone,
    Failed(String),
}

/// `status` is the answer's `:status`, `None` when it had none (a reset); `body` is
/// `None` when it was longer than `MAX_ANSWER_BYTES` and so not read.
pub fn classify(status: Option<&[u8]>, body: Option<&[u8]>) -> FeedAnswer {
    let code = status.and_then(status_code);
    match (code, body) {
        (Some(410), _) => FeedAnswer::Gone,
        (Some(200), None) => {
            FeedAnswer::Failed(format!("an answer of more than {MAX_ANSWER_BYTES} bytes"))
        }
        (Some(200), Some(body)) => parse(body).unwrap_or_else(FeedAnswer::Failed),
        (Some(other), _) => FeedAnswer::Failed(format!("answered HTTP {other}")),
        (None, _) => FeedAnswer::Failed("no response (connection refused or reset)".into()),
    }
}

/// All or nothing: one bad hash makes the whole answer a failure, never a partial flush.
/// (Read as a `Value`, like records: a typed deserializer would add ~70 KB to the .wasm.)
fn parse(body: &[u8]) -> Result<FeedAnswer, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not a feed answer: {e}"))?;
    let answer = Object::new("", &doc).map_err(|e| e.to_string())?;
    let cursor = match answer.string("cursor").map_err(|e| e.to_string())? {
        Some(cursor) if is_cursor(cursor) => cursor.to_string(),
        _ => return Err("cursor must be 1 to 256 visible ASCII bytes".into()),
    };
    let Some(Value::Array(hashes)) = answer.value("key_hashes") else {
        return Err("key_hashes must be a list".into());
    };
    let key_hashes = hashes
        .iter()
        .map(|hex| {
            hex.as_str()
                .and_then(parse_hash)
                .ok_or_else(|| "a key hash is not 64 lowercase hex digits".to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok(FeedAnswer::Changes { cursor, key_hashes })
}

fn is_cursor(cursor: &str) -> bool {
    (1..=256).contains(&cursor.len()) && cursor.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn parse_hash(hex: &str) -> Option<KeyHash> {
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex, &mut hash).ok()?;
    Some(hash)
}

/// The path of a poll: the feed's own, with `after` when the node has a cursor.
pub fn poll_path(path: &str, cursor: Option<&str>) -> String {
    match cursor {
        Some(cursor) => format!("{path}?after={}", form_encode(cursor.as_bytes())),
        None => path.to_string(),
    }
}

/// Where the node's feed stands, as kept in shared data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedState {
    /// Entries stored under an older epoch are forgotten. Moves on with every 410.
    pub epoch: u32,
    /// What the next poll sends as `after`; `None`: the next poll asks without.
    pub cursor: Option<String>,
    /// When the feed last answered 200 (0: never).
    pub last_ok_ms: u64,
    /// When the last poll was started, and by whom (a worker's queue).
    pub polled_at_ms: u64,
    pub poller: u32,
}

const FORMAT_VERSION: u8 = 1;

impl FeedState {
    /// Whether a poll is due at `now_ms`: one per `interval_ms` for the node.
    pub fn poll_due(&self, now_ms: u64, interval_ms: u64) -> bool {
        self.polled_at_ms == 0 || now_ms >= self.polled_at_ms.saturating_add(interval_ms)
    }

    pub fn encode(&self) -> Vec<u8> {
        let cursor = self.cursor.as_deref().unwrap_or_default().as_bytes();
        let mut out = Vec::with_capacity(26 + cursor.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.last_ok_ms.to_le_bytes());
        out.extend_from_slice(&self.polled_at_ms.to_le_bytes());
        out.extend_from_slice(&self.poller.to_le_bytes());
        out.extend_from_slice(cursor);
        out
    }

    /// `None` for anything that is not a state of this format (a missing one reads as
    /// the default: epoch 0, never polled).
    pub fn decode(bytes: &[u8]) -> Option<FeedState> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT_VERSION || rest.len() < 24 {
            return None;
        }
        let (head, cursor) = rest.split_at(24);
        let u64_at = |i: usize| Some(u64::from_le_bytes(head.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(head.get(i..i + 4)?.try_into().ok()?));
        let cursor = std::str::from_utf8(cursor).ok()?;
        Some(FeedState {
            epoch: u32_at(0)?,
            last_ok_ms: u64_at(4)?,
            polled_at_ms: u64_at(12)?,
            poller: u32_at(20)?,
            cursor: (!cursor.is_empty()).then(|| cursor.to_string()),
        })
    }
}

/// Whether a feed that last answered 200 at `last_ok_ms` is healthy at `now_ms`.
pub fn is_healthy(last_ok_ms: u64, now_ms: u64, interval_ms: u64) -> bool {
    last_ok_ms != 0
        && now_ms.saturating_sub(last_ok_ms) < interval_ms.saturating_mul(HEALTHY_INTERVALS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::key_hash::{hash_hex, hash_key};

    #[test]
    fn a_200_lists_the_changed_hashes_and_the_new_cursor() {
        let (a, b) = (hash_key(b"a"), hash_key(b"b"));
        let body = format!(
            r#"{{"cursor": "c-1042", "key_hashes": ["{}", "{}"], "more": 1}}"#,
            hash_hex(&a),
            hash_hex(&b)
        );
        assert_eq!(
            classify(Some(b"200"), Some(body.as_bytes())),
            FeedAnswer::Changes {
                cursor: "c-1042".into(),
                key_hashes: vec![a, b]
            }
        );
        assert_eq!(
            classify(
                Some(b"200"),
                Some(br#"{"cursor": "c-1", "key_hashes": []}"#)
            ),
            FeedAnswer::Changes {
                cursor: "c-1".into(),
                key_hashes: vec![]
            }
        );
    }

    #[test]
    fn a_410_is_gone_and_anything_else_is_a_failure_never_a_flush() {
        assert_eq!(classify(Some(b"410"), Some(b"")), FeedAnswer::Gone);
        assert_eq!(classify(Some(b"410"), None), FeedAnswer::Gone);
        let upper = format!(r#"{{"cursor": "c", "key_hashes": ["{}"]}}"#, "A".repeat(64));
        let short = r#"{"cursor": "c", "key_hashes": ["abc"]}"#.to_string();
        let no_cursor = r#"{"cursor": "", "key_hashes": []}"#.to_string();
        let spaced = r#"{"cursor": "a b", "key_hashes": []}"#.to_string();
        let long = format!(r#"{{"cursor": "{}", "key_hashes": []}}"#, "c".repeat(257));
        for (status, body) in [
            (Some(&b"500"[..]), Some(&b""[..])),
            (None, Some(&b""[..])),
            (Some(b"200"), None),
            (Some(b"200"), Some(b"{\"cursor\": ")),
            (Some(b"200"), Some(br#"{"key_hashes": []}"#)),
            (Some(b"200"), Some(upper.as_bytes())),
            (Some(b"200"), Some(short.as_bytes())),
            (Some(b"200"), Some(no_cursor.as_bytes())),
            (Some(b"200"), Some(spaced.as_bytes())),
            (Some(b"200"), Some(long.as_bytes())),
        ] {
            assert!(
                matches!(classify(status, body), FeedAnswer::Failed(_)),
                "{status:?} {body:?}"
            );
        }
    }

    #[test]
    fn a_poll_sends_the_cursor_encoded() {
        assert_eq!(poll_path("/v1/key-changes", None), "/v1/key-changes");
        assert_eq!(
            poll_path("/v1/key-changes", Some("c-1&x=ü")),
            "/v1/key-changes?after=c-1%26x%3D%C3%BC"
        );
    }

    #[test]
    fn the_state_round_trips_and_says_when_a_poll_is_due() {
        let state = FeedState {
            epoch: 3,
            cursor: Some("c-9".into()),
            last_ok_ms: 10,
            polled_at_ms: 1_000,
            poller: 7,
        };
        assert_eq!(FeedState::decode(&state.encode()), Some(state.clone()));
        let fresh = FeedState::default();
        assert_eq!(FeedState::decode(&fresh.encode()), Some(fresh.clone()));
        assert!(fresh.poll_due(0, 1_000));
        assert!(!state.poll_due(1_999, 1_000));
        assert!(state.poll_due(2_000, 1_000));
        assert_eq!(FeedState::decode(&[]), None);
        assert_eq!(FeedState::decode(&[2; 30]), None);
    }

    #[test]
    fn healthy_for_three_intervals_after_a_200() {
        assert!(!is_healthy(0, 5, 1_000), "never answered");
        assert!(is_healthy(10_000, 12_999, 1_000));
        assert!(!is_healthy(10_000, 13_000, 1_000));
    }
}
