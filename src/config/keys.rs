//! Client keys: the `auth:` section and the `auth.keys_file` document, which share one key
//! list format and one validation.
//!
//! Keys are turned into their SHA-256 digest here, at parse time, and the configured key is
//! dropped: the running proxy never holds one in clear. The digest function lives here
//! rather than in `auth` because config is the lower layer (auth reads config, never the
//! reverse); `auth` re-exports it for hashing presented keys.

use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::parse::de_duration;
use super::{path_error, ConfigError};

/// SHA-256 of an API key: the only form in which keys are kept.
pub type KeyDigest = [u8; 32];

/// The digest of a key as stored; a presented key is hashed with this same function.
pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// Client authentication: on when `keys` is non-empty or `keys_file` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub keys: Vec<ApiKey>,
    /// More keys in their own YAML/JSON file (`keys: [...]`), re-read when it changes.
    pub keys_file: Option<std::path::PathBuf>,
    /// How often `keys_file` is checked for a change (inode, size, mtime).
    pub keys_file_poll: Duration,
    /// Send the client's `Authorization` / `x-api-key` upstream (default: stripped).
    pub forward_client_key: bool,
}

impl Auth {
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.keys_file.is_some()
    }
}

/// One named client key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Appears as `key_id` in usage events and access logs.
    pub name: String,
    pub digest: KeyDigest,
    /// `None` = every model.
    pub models: Option<Vec<String>>,
    /// Requests per minute; 0 = unlimited.
    pub rpm: u64,
    /// Tokens per minute (charged from the usage of finished requests); 0 = unlimited.
    pub tpm: u64,
    /// May use the admin endpoints (`POST /admin/reload`) on the main listener.
    pub admin: bool,
    /// Its requests' class while they wait for a backend slot.
    pub priority: Priority,
    /// Its share of the turns within its class while keys wait (`fair`): a key of weight 2 gets
    /// twice the dispatches of a key of weight 1 when both have requests waiting.
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with keys, keys_file, keys_file_poll, forward_client_key"
)]
pub(super) struct RawAuth {
    keys: Vec<RawKey>,
    keys_file: Option<String>,
    #[serde(deserialize_with = "de_duration")]
    pub(super) keys_file_poll: Duration,
    forward_client_key: bool,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            keys: Vec::new(),
            keys_file: None,
            keys_file_poll: Duration::from_secs(5),
            forward_client_key: false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with name, key or key_sha256, models, rpm, tpm, admin, priority, weight"
)]
struct RawKey {
    name: String,
    key: Option<String>,
    key_sha256: Option<String>,
    models: Vec<String>,
    rpm: u64,
    tpm: u64,
    admin: bool,
    priority: Priority,
    weight: Option<u32>,
}

/// The shape of `auth.keys_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with a `keys` list")]
struct RawKeysFile {
    keys: Vec<RawKey>,
}

/// The largest `weight`: the fair queue's turn arithmetic stays exact below it.
const MAX_WEIGHT: u32 = 1000;

/// Raw keys shorter than this are refused: they could be guessed.
const MIN_KEY_LEN: usize = 16;

pub(super) fn validate_auth(raw: RawAuth, errors: &mut Vec<String>) -> Auth {
    let keys = validate_keys(raw.keys, "auth.keys", errors);
    let keys_file = raw
        .keys_file
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from);
    Auth {
        keys,
        keys_file,
        keys_file_poll: raw.keys_file_poll,
        forward_client_key: raw.forward_client_key,
    }
}

fn validate_keys(raw: Vec<RawKey>, at: &str, errors: &mut Vec<String>) -> Vec<ApiKey> {
    let mut keys: Vec<ApiKey> = Vec::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let at = format!("{at}[{i}]");
        let name = k.name.trim().to_string();
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b));
        if !name_ok {
            errors.push(format!(
                "{at}.name: must be 1-128 characters of A-Z a-z 0-9 - _ . : @ /"
            ));
        } else if keys.iter().any(|o| o.name == name) {
            errors.push(format!("{at}.name: duplicate key name \"{name}\""));
        }
        let digest = match (k.key, k.key_sha256) {
            (Some(key), None) if key.len() >= MIN_KEY_LEN => Some(digest(&key)),
            (Some(_), None) => {
                errors.push(format!(
                    "{at}.key: must be at least {MIN_KEY_LEN} characters"
                ));
                None
            }
            (None, Some(hex)) => match parse_hex_digest(hex.trim()) {
                Some(d) => Some(d),
                None => {
                    errors.push(format!(
                        "{at}.key_sha256: must be 64 hex digits (sha256sum of the key)"
                    ));
                    None
                }
            },
            (Some(_), Some(_)) => {
                errors.push(format!("{at}: give key or key_sha256, not both"));
                None
            }
            (None, None) => {
                errors.push(format!("{at}: key or key_sha256 is required"));
                None
            }
        };
        for (j, m) in k.models.iter().enumerate() {
            if m.trim().is_empty() {
                errors.push(format!("{at}.models[{j}]: model name must not be empty"));
            }
        }
        let weight = k.weight.unwrap_or(1);
        if !(1..=MAX_WEIGHT).contains(&weight) {
            errors.push(format!("{at}.weight: must be 1 to {MAX_WEIGHT}"));
        }
        let Some(digest) = digest else { continue };
        if let Some(o) = keys.iter().find(|o| o.digest == digest) {
            errors.push(format!("{at}: same key as \"{}\"", o.name));
            continue;
        }
        keys.push(ApiKey {
            name,
            digest,
            models: (!k.models.is_empty()).then_some(k.models),
            rpm: k.rpm,
            tpm: k.tpm,
            admin: k.admin,
            priority: k.priority,
            weight,
        });
    }
    keys
}

/// Parses the text of an `auth.keys_file` (YAML or JSON; `${VAR}` is not expanded: the file is
/// the secret). Errors are `path: reason` lines.
pub fn parse_keys_file(text: &str) -> Result<Vec<ApiKey>, ConfigError> {
    let raw: RawKeysFile =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| path_error(e, "keys file"))?;
    let mut errors = Vec::new();
    let keys = validate_keys(raw.keys, "keys", &mut errors);
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

fn parse_hex_digest(s: &str) -> Option<KeyDigest> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// A request's class when it waits for a backend slot (`auth.keys[].priority`, lowered by the
/// `x-llmproxy-priority` header). Ordered: `High < Normal < Low` (the smaller goes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }

    pub fn index(self) -> usize {
        self as usize
    }
}
