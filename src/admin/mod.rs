//! The admin side: creating a cluster's files and reading its status.
//! (Tenants, node moves and rebalancing come with later issues.)

pub mod init;
pub mod status;

pub use init::{init_cluster, InitOptions, S3Env};
