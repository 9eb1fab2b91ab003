//! The token counts a response reports and where they came from: the OpenAI `usage` object
//! (and its details), llama.cpp's `timings`, TGI's `details`, each turned into one `Usage`.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Where an event's token counts came from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The engine's own figures (final or running usage, llama.cpp's timings, TGI's details).
    #[default]
    Reported,
    /// The proxy counted the content deltas it relayed (the engine reported nothing).
    Counted,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reported => "reported",
            Source::Counted => "counted",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(skip)]
    pub source: Source,
}

#[derive(Deserialize)]
pub(super) struct UsageJson {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, alias = "output_tokens_details")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
pub(super) struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
pub(super) struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<UsageJson> for Usage {
    fn from(u: UsageJson) -> Usage {
        let prompt = u.prompt_tokens.unwrap_or(0);
        let completion = u.completion_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // Counts come from the backend: an absurd one must not overflow (a panic in debug
            // builds, a wrapped total in release).
            total_tokens: u.total_tokens.unwrap_or(prompt.saturating_add(completion)),
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens),
            source: Source::Reported,
        }
    }
}

/// llama.cpp's per-chunk `timings`: `prompt_n` prompt tokens evaluated (the cached ones,
/// `cache_n`, are not among them), `predicted_n` tokens generated so far.
#[derive(Deserialize)]
pub(super) struct Timings {
    #[serde(default)]
    prompt_n: Option<u64>,
    #[serde(default)]
    predicted_n: Option<u64>,
    #[serde(default)]
    pub(super) cache_n: Option<u64>,
}

impl Timings {
    pub(super) fn usage(self) -> Option<Usage> {
        let completion = self.predicted_n?;
        let cached = self.cache_n;
        let prompt = self
            .prompt_n
            .unwrap_or(0)
            .saturating_add(cached.unwrap_or(0));
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: cached,
            reasoning_tokens: None,
            source: Source::Reported,
        })
    }
}

#[derive(Deserialize)]
pub(super) struct TgiBody {
    #[serde(default)]
    pub(super) details: Option<TgiDetails>,
}

#[derive(Deserialize)]
pub(super) struct TgiDetails {
    #[serde(default)]
    generated_tokens: Option<u64>,
    #[serde(default)]
    input_length: Option<u64>,
    #[serde(default)]
    prefill: Option<Vec<IgnoredAny>>,
}

impl TgiDetails {
    pub(super) fn usage(self) -> Usage {
        let prompt = self
            .input_length
            .or_else(|| self.prefill.map(|p| p.len() as u64))
            .unwrap_or(0);
        let completion = self.generated_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: None,
            reasoning_tokens: None,
            source: Source::Reported,
        }
    }
}
