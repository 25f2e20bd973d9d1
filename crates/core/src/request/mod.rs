pub mod authorize;
pub mod client_address;
pub mod denial;
pub mod extract;
pub mod header_map;
pub mod key_format;
pub mod query;
pub mod rules;
