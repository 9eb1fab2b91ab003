//! The data one request carries through the mock: the request as read (`Exchange`), what to
//! answer (`Action`), the generation it asks for (`Kind`, `Ask`, `Completion`; their bodies are
//! built by `generation`, `openai` and `tgi`), and what happens to the connection afterwards
//! (`Flow`). Types only, so that every step can name them without importing another step.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Version};

use super::hooks::Hooks;
use super::wire::Reply;

/// What happens to the connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    KeepAlive,
    Close,
    /// Abort with a TCP reset (`x-mock-reset-after`).
    Reset,
    /// The client went away mid-response.
    Gone,
}

/// Everything about one request that the answer depends on.
pub(super) struct Exchange {
    pub(super) method: Method,
    pub(super) path: String,
    /// Path with query, as received.
    pub(super) target: String,
    pub(super) version: Version,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Bytes,
    pub(super) keep_alive: bool,
    pub(super) hooks: Hooks,
}

/// What to answer.
pub(super) enum Action {
    /// Answer at once.
    Reply(Reply),
    /// A non-streaming generation: answer after `wait`.
    Delayed { reply: Reply, wait: Duration },
    /// An SSE stream.
    Stream(Completion),
}

impl Action {
    /// True when answering involves no waiting, so the peer need not be watched.
    pub(super) fn is_instant(&self) -> bool {
        match self {
            Action::Reply(_) => true,
            Action::Delayed { wait, .. } => wait.is_zero(),
            Action::Stream(_) => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Text,
    /// TGI `/generate`
    Tgi,
    /// TGI `/generate_stream`
    TgiStream,
}

/// What a generation request asks for, read from its body by its dialect.
pub(super) struct Ask {
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u32,
    pub(super) stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub(super) include_usage: bool,
    /// `stream_options.continuous_usage_stats` with `include_usage`: like vLLM, every chunk
    /// carries the usage so far.
    pub(super) running_usage: bool,
    /// TGI `parameters.details`.
    pub(super) details: bool,
}

/// One simulated generation; builds the non-streaming body and every SSE event.
#[derive(Debug, Clone)]
pub(super) struct Completion {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u32,
    pub(super) include_usage: bool,
    /// See `Ask::running_usage`.
    pub(super) running_usage: bool,
}
