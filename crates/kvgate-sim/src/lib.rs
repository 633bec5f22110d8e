//! Routing quality without GPUs: a fleet of simulated engines (`kvgate-engine`: the mocker's
//! cache and timing model) replays a Mooncake-format trace in virtual time under each routing
//! policy, on identical hardware, and reports what each achieved.
//!
//! - [`trace`]: parsing traces, expanding block ids to prompts, the trace's reuse bound;
//! - [`tracegen`]: seeded traces of other shapes (agent loops, short chats, huge documents);
//! - [`policy`]: the peer policies compared (random, round-robin, least-load, GAIE's default
//!   picker, SGLang's cache-aware router, llm-d's default profile, LMetric) and the router core
//!   itself under either of its policies (Dynamo's cost function, kvgate's): the core's code is
//!   not copied here, it is called;
//! - [`replicas`]: N router replicas behind one gateway, sharing bookings after a delay or not;
//! - [`sim`]: the discrete-event simulation and the figures per policy.

pub mod policy;
pub mod replicas;
pub mod sim;
pub mod trace;
pub mod tracegen;
