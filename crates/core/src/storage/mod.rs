pub mod bytes;
pub mod process_store;
pub mod shared_store;
pub mod slots;
