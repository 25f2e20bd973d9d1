pub mod bucket_spec;
pub mod canonical_path;
pub mod cidr;
pub mod decimal;
pub mod form;
pub mod json_fields;
pub mod key_hash;
pub mod referrer;
