pub mod bytes;
pub mod shared_store;
pub mod slots;
