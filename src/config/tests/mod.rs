//! Unit tests of `config`, one file per stage: `load` (whole documents, `${VAR}`, YAML
//! features), `validate` (each section's rules, with the path every error names) and `parse`
//! (the value parsers on their own). The helpers here parse with a fixed fake environment.

use std::env::VarError;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::load::from_yaml_with_env;
use super::parse::{parse_duration, parse_size, MAX_DURATION};
use super::*;

mod limits;
mod load;
mod parse;
mod validate;

const MINIMAL: &str = "backends: [{ url: \"http://127.0.0.1:8000\" }]\n";

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    from_yaml_with_env(yaml, &|name| match name {
        "BILLING_URL" => Ok("https://billing.example.com/usage".to_string()),
        "BACKEND_HOST" => Ok("vllm-7".to_string()),
        "EMPTY" => Ok(String::new()),
        "REDIS_PASSWORD" => Ok("s3cret".to_string()),
        _ => Err(VarError::NotPresent),
    })
}

fn ok(yaml: &str) -> Config {
    match parse(yaml) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}\n--- yaml:\n{yaml}"),
    }
}

fn errors(yaml: &str) -> Vec<String> {
    match parse(yaml) {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(ConfigError::Invalid(lines)) => lines,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Asserts that some error line starts with `path: ` and contains `needle`.
#[track_caller]
fn assert_error(yaml: &str, path: &str, needle: &str) {
    let errs = errors(yaml);
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(needle)),
        "no error at {path} containing {needle:?}; got {errs:#?}"
    );
}

fn with_backend(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}
