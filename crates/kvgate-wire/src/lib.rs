//! Formats at kvgate's edges, decoded into the core's types and encoded back:
//! - [`openai`]: OpenAI chat / completions request bodies, and `nvext.token_data` injection.
//! - [`workers`]: the workers file (YAML) shared by the frontend and the EPP.

pub mod dynamo;
pub mod openai;
pub mod response;
pub mod vllm;
pub mod workers;
