pub mod coordinator;
pub mod lease;
pub mod scheduler;
pub mod workers;
