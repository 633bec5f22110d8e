//! Glue shared by kvgate's servers (mocker, frontend, and the EPP to come):
//! - [`http`]: OpenAI-shaped JSON errors and bounded body reading;
//! - [`prom`]: a small Prometheus text-exposition writer.

pub mod http;
pub mod prom;
