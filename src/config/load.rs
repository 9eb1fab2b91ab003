//! Loading: YAML text → `${VAR}` expansion → the `raw` shapes → `validate`.
//!
//! `${VAR}` is expanded in string values only (never in keys) and before deserialisation, so a
//! substituted value is parsed and checked exactly like a literal one, and a missing variable is
//! reported at the path of the value that names it.

use std::env::VarError;
use std::net::SocketAddr;
use std::path::Path;

use serde_path_to_error::Segment;
use serde_yaml::Value;

use super::raw::{RawBackend, RawConfig};
use super::validate::validate;
use super::{path_line, Config, ConfigError};

impl Config {
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        from_yaml_with_env(text, &|name| std::env::var(name))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml_str(&text)
    }

    /// A config with defaults for everything and these backend URLs (used by the `demo` command
    /// and tests); validates the URLs.
    pub fn with_backends(listen: SocketAddr, urls: &[String]) -> Result<Config, ConfigError> {
        let raw = RawConfig {
            listen: listen.to_string(),
            backends: urls
                .iter()
                .map(|url| RawBackend {
                    url: url.clone(),
                    ..RawBackend::default()
                })
                .collect(),
            ..RawConfig::default()
        };
        validate(raw)
    }
}

pub(super) type EnvLookup<'a> = &'a dyn Fn(&str) -> Result<String, VarError>;

/// The environment is a parameter so tests never mutate the process environment.
pub(super) fn from_yaml_with_env(text: &str, env: EnvLookup) -> Result<Config, ConfigError> {
    let mut value: Value = serde_yaml::from_str(text)
        .map_err(|e| ConfigError::Invalid(vec![format!("invalid YAML: {e}")]))?;
    // An empty file is a config with nothing set; report what is missing, not a type error.
    if value.is_null() {
        value = Value::Mapping(Default::default());
    }
    value
        .apply_merge()
        .map_err(|e| ConfigError::Invalid(vec![format!("invalid YAML: {e}")]))?;

    let mut errors = Vec::new();
    expand_env(&mut value, &mut String::new(), env, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }

    deserialize_all(value)
}

/// At most this many type errors are collected from one file (each costs one more pass).
const MAX_TYPE_ERRORS: usize = 50;

/// Deserialises into the raw shapes, then validates, reporting every problem at once. serde stops
/// at the first type error, so the value at each failing path is taken out (its default applies)
/// and the document is read again; the problems `validate` then finds are added, except those at
/// a path already reported (the default standing in for a removed value is not the user's).
fn deserialize_all(mut value: Value) -> Result<Config, ConfigError> {
    let mut errors = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        match serde_path_to_error::deserialize::<_, RawConfig>(value.clone()) {
            Ok(raw) if errors.is_empty() => return validate(raw),
            Ok(raw) => {
                if let Err(ConfigError::Invalid(more)) = validate(raw) {
                    errors.extend(more.into_iter().filter(|line| {
                        !removed.iter().any(|p| {
                            line.strip_prefix(p.as_str())
                                .is_some_and(|rest| rest.starts_with([':', '.', '[']))
                        })
                    }));
                }
                return Err(ConfigError::Invalid(errors));
            }
            Err(e) => {
                let segments: Vec<Segment> = e.path().iter().cloned().collect();
                let path = e.path().to_string();
                // The same path failing again means what stands in for it does not fit either.
                if removed.contains(&path) {
                    return Err(ConfigError::Invalid(errors));
                }
                errors.push(path_line(e, "config"));
                if errors.len() >= MAX_TYPE_ERRORS || !remove_at(&mut value, &segments) {
                    return Err(ConfigError::Invalid(errors));
                }
                removed.push(path);
            }
        }
    }
}

/// Removes the value at `path` from `value`; false when there is no such value (or the path is
/// the whole document), which ends the collection.
fn remove_at(value: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for segment in parents {
        let next = match (segment, at) {
            (Segment::Seq { index }, Value::Sequence(items)) => items.get_mut(*index),
            (Segment::Map { key }, Value::Mapping(map)) => map.get_mut(key.as_str()),
            _ => None,
        };
        match next {
            Some(v) => at = v,
            None => return false,
        }
    }
    match (last, at) {
        (Segment::Seq { index }, Value::Sequence(items)) if *index < items.len() => {
            // Keep the indexes of later items: an empty mapping takes an entry's defaults.
            items[*index] = Value::Mapping(Default::default());
            true
        }
        (Segment::Map { key }, Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        _ => false,
    }
}

/// Replaces `${VAR}` in every string value (not in keys), recording `path: reason` per failure.
fn expand_env(value: &mut Value, path: &mut String, env: EnvLookup, errors: &mut Vec<String>) {
    match value {
        Value::String(s) => match substitute_env(s, env) {
            Ok(Some(expanded)) => *s = expanded,
            Ok(None) => {}
            Err(reason) => {
                let at = if path.is_empty() { "config" } else { path };
                errors.push(format!("{at}: {reason}"));
            }
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                match key {
                    Value::String(k) => path.push_str(k),
                    other => {
                        path.push_str(serde_yaml::to_string(other).unwrap_or_default().trim_end())
                    }
                }
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Tagged(tagged) => expand_env(&mut tagged.value, path, env, errors),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// `Ok(None)` when `s` has no reference, so untouched strings are not reallocated.
fn substitute_env(s: &str, env: EnvLookup) -> Result<Option<String>, String> {
    if !s.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated \"${\" (expected ${NAME})".to_string())?;
        let name = &after[..end];
        let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!("invalid environment variable name \"{name}\""));
        }
        match env(name) {
            Ok(v) => out.push_str(&v),
            Err(VarError::NotPresent) => {
                return Err(format!("environment variable {name} is not set"))
            }
            Err(VarError::NotUnicode(_)) => {
                return Err(format!("environment variable {name} is not valid UTF-8"))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(out))
}
