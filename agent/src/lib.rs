//! The `credlet` binary's wiring: command line, configuration checks,
//! logging, the agent's start-up and graceful shutdown, and the demo.
//!
//! The logic lives in the library crates (`credlet-csi`, `credlet-ca`); this
//! crate only puts them together.

pub mod agent;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod health;
pub mod kubeapi;
pub mod logging;
pub mod metrics;
