//! Quotas kept across every Envoy node by a rate limit service (CONTRACT "Quotas"): the quota
//! form, the RLS messages and what an answer means, and each key's allowance on a node.
pub mod allowance;
pub mod quota;
pub mod rls;
pub mod rls_messages;
pub mod store;
