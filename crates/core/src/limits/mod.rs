pub mod bucket;
pub mod buckets;
