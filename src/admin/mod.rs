//! The admin side: creating a cluster's files, reading its status, and
//! managing tenants and their access keys.
//! (Quotas, node moves and rebalancing come with later issues.)

pub mod init;
pub mod status;
pub mod tenants;

pub use init::{init_cluster, InitOptions, S3Env};
