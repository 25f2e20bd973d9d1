pub mod answer;
pub mod cache;
pub mod copies;
pub mod entry;
pub mod feed;
pub mod known_key;
pub mod record;
pub mod trust;
