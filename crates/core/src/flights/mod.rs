pub mod coordinator;
pub mod lease;
pub mod pending;
pub mod scheduler;
pub mod workers;
