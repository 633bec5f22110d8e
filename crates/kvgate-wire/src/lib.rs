//! Formats at kvgate's edges, decoded into the core's types and encoded back:
//! - [`openai`]: OpenAI chat / completions request bodies, and `nvext.token_data` injection.
//! - [`dynamo_plane`]: Dynamo 1.6's event plane envelope and payloads, as a worker publishes them.
//! - [`workers`]: the workers file (YAML) shared by the frontend and the EPP.

pub mod dynamo;
pub mod dynamo_plane;
pub mod openai;
pub mod response;
pub mod vllm;
pub mod workers;
