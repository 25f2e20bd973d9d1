//! `take_param` and `form_decode` on arbitrary paths and names: `:path` is the
//! client's, byte for byte.
#![no_main]

use apikey_core::request::query::{split_path, take_param};
use apikey_core::vocabulary::form::form_decode;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Name<'a> {
    ApiKey,
    Short,
    Empty,
    Any(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    name: Name<'a>,
    /// A lone form component for `form_decode`.
    component: &'a [u8],
    /// The rest of the input.
    path: &'a [u8],
}

/// Splits a query into its `name=value` pieces, the way a form does.
fn pieces(query: &[u8]) -> Vec<&[u8]> {
    query.split(|&b| b == b'&').collect()
}

fn name_of(piece: &[u8]) -> &[u8] {
    piece.split(|&b| b == b'=').next().unwrap_or(piece)
}

fn value_of(piece: &[u8]) -> &[u8] {
    match piece.iter().position(|&b| b == b'=') {
        Some(i) => &piece[i + 1..],
        None => b"",
    }
}

fn percent_encode_all(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .flat_map(|b| format!("%{b:02X}").into_bytes())
        .collect()
}

fuzz_target!(|input: Input<'_>| {
    let name: &[u8] = match &input.name {
        Name::ApiKey => b"api_key",
        Name::Short => b"k",
        Name::Empty => b"",
        Name::Any(name) => name,
    };
    let path = input.path;

    let taken = take_param(path, name);
    let (base, query) = split_path(path);
    assert_eq!(taken.values.is_empty(), taken.rewritten.is_none());

    // What should go and what should stay, computed independently.
    let original = query.map(pieces).unwrap_or_default();
    let (gone, kept): (Vec<&[u8]>, Vec<&[u8]>) = original
        .iter()
        .partition(|piece| !piece.is_empty() && form_decode(name_of(piece)) == name);
    let expected_values: Vec<Vec<u8>> = gone.iter().map(|p| form_decode(value_of(p))).collect();
    assert_eq!(taken.values, expected_values);

    if let Some(rewritten) = &taken.rewritten {
        assert!(rewritten.len() < path.len(), "rewrite did not shrink");
        assert!(
            take_param(rewritten, name).values.is_empty(),
            "parameter left"
        );
        let (new_base, new_query) = split_path(rewritten);
        assert_eq!(new_base, base, "the path proper changed");
        match new_query {
            // Every other parameter, byte for byte, in order.
            Some(new_query) => assert_eq!(pieces(new_query), kept),
            // The `?` goes only when nothing but empty pieces was left.
            None => assert!(kept.iter().all(|p| p.is_empty())),
        }
    }

    // form_decode: never longer, identity without escapes, inverts percent-encoding.
    let component = input.component;
    let decoded = form_decode(component);
    assert!(decoded.len() <= component.len());
    if !component.contains(&b'%') && !component.contains(&b'+') {
        assert_eq!(decoded, component);
    }
    assert_eq!(form_decode(&percent_encode_all(component)), component);
});
