//! What the proxy tells its operators: Prometheus metrics, log lines (through a writer thread),
//! and the counters of requests refused on purpose. A leaf: it takes plain numbers and names from
//! the request path and imports nothing of it.

pub(crate) mod banner;
mod buckets;
pub mod logging;
pub mod metrics;
mod process;
pub(crate) mod queue;
pub(crate) mod ratestore;
pub(crate) mod reject;
