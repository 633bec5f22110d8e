//! Routing quality without GPUs: a fleet of simulated engines (`kvgate-engine`: the mocker's
//! cache and timing model) replays a Mooncake-format trace in virtual time under each routing
//! policy, on identical hardware, and reports what each achieved.
//!
//! - [`trace`]: parsing traces, expanding block ids to prompts, the trace's reuse bound;
//! - [`policy`]: the policies compared (random, round-robin, least-load, GAIE's default picker,
//!   SGLang's cache-aware router, Dynamo's cost function, kvgate's);
//! - [`sim`]: the discrete-event simulation and the figures per policy.

pub mod policy;
pub mod sim;
pub mod trace;
