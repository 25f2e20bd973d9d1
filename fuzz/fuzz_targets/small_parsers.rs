//! The small parsers: `client_address::without_port` (Envoy's `source.address`, which
//! comes from `X-Forwarded-For` unless the connection manager says otherwise) and
//! `lookup_lock::Message::decode` (queue messages; any VM on the node may enqueue).
//!
//! The first input byte picks the parser, the rest is its input.
#![no_main]

use apikey_core::flights::coordinator::Message;
use apikey_core::request::client_address::without_port;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        if let Some(host) = without_port(input) {
            assert!(!host.is_empty());
            let text = std::str::from_utf8(input).unwrap();
            assert!(text.contains(host.as_str()), "{host:?} not in {text:?}");
            // Never keeps an IPv4 `:port`: a host with one colon is bracketed input.
            assert!(host.matches(':').count() != 1 || text.trim().starts_with('['));
        }
    } else if let Some(message) = Message::decode(input) {
        // The encoding is canonical: decode accepts exactly what encode writes.
        assert_eq!(message.encode(), input);
    }
});
