//! Order processing with Sagaflow: the saga, the HTTP service, fake providers, and the
//! chaos run. `src/main.rs` is the `order-processing` binary.

pub mod chaos;
pub mod providers;
pub mod reconcile;
#[cfg(test)]
mod reconcile_tests;
pub mod saga;
#[cfg(test)]
mod saga_tests;
pub mod server;
#[cfg(test)]
mod server_tests;
pub mod service;
#[cfg(test)]
mod service_tests;
