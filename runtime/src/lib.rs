//! lavit-runtime: the frame every LaVIT stage plugs into. It knows no concrete stage:
//! errors, the official hyper-parameters (`manifest`), checkpoint I/O (`checkpoint`),
//! parity comparison, and (added by later issues) config, devices, messages and the
//! stage/actor machinery.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod dist;
pub mod error;
pub mod fsread;
pub mod image_input;
pub mod layers;
pub mod layout;
pub mod manifest;
pub mod parity;
pub mod plugin_host;
pub mod shape;
pub mod train;

pub use error::{Error, Result, TchContext};
pub mod actors;
pub mod inflight;
pub mod kinds;
pub mod messages;
/// Deterministic mock stages (tests, wiring checks, examples): only with the `testing` feature.
#[cfg(feature = "testing")]
pub mod mock;
pub mod stage;
