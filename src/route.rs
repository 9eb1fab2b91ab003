//! Where a request goes: answered locally (health, metrics, model list) or to the set of
//! backends that serve its model. The table is built once from config and only read afterwards.

use std::collections::HashMap;

use crate::config::Config;
use crate::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Health,
    Metrics,
    Models,
    /// `/metrics` asked on the main listener while an admin listener serves it: never proxied
    /// (that would expose a backend's own metrics), answered 404.
    MetricsElsewhere,
}

pub struct RouteTable {
    /// Backends eligible for each configured model (including backends that serve any model).
    by_model: HashMap<String, Vec<bool>>,
    /// Backends without a `models` list.
    any_model: Vec<bool>,
    all: Vec<bool>,
    /// The union of configured models, when every backend declares its models.
    pub model_list: Option<Vec<String>>,
}

impl RouteTable {
    pub fn new(cfg: &Config) -> Self {
        let n = cfg.backends.len();
        let any_model: Vec<bool> = cfg.backends.iter().map(|b| b.models.is_none()).collect();
        let mut by_model: HashMap<String, Vec<bool>> = HashMap::new();
        for (i, b) in cfg.backends.iter().enumerate() {
            for m in b.models.iter().flatten() {
                by_model
                    .entry(m.clone())
                    .or_insert_with(|| any_model.clone())[i] = true;
            }
        }
        let model_list = if any_model.iter().any(|a| *a) {
            None
        } else {
            let mut names: Vec<String> = by_model.keys().cloned().collect();
            names.sort();
            Some(names)
        };
        RouteTable {
            by_model,
            any_model,
            all: vec![true; n],
            model_list,
        }
    }

    /// Which backends may serve a request for `model`.
    pub fn backends_for(&self, model: Option<&str>) -> Result<&[bool], ProxyError> {
        match model {
            None => Ok(&self.all),
            Some(m) => match self.by_model.get(m) {
                Some(mask) => Ok(mask),
                None if self.any_model.iter().any(|a| *a) => Ok(&self.any_model),
                None => Err(ProxyError::UnknownModel(m.to_string())),
            },
        }
    }

    /// Endpoints the proxy answers itself. `/metrics` moves to the admin listener when one is set.
    pub fn local(&self, method: &str, path: &str, metrics_here: bool) -> Option<Local> {
        if !(method == "GET" || method == "HEAD") {
            return None;
        }
        match path {
            "/health" => Some(Local::Health),
            "/metrics" if metrics_here => Some(Local::Metrics),
            "/metrics" => Some(Local::MetricsElsewhere),
            "/v1/models" if self.model_list.is_some() => Some(Local::Models),
            _ => None,
        }
    }

    pub fn models_body(&self) -> Vec<u8> {
        let data: Vec<serde_json::Value> = self
            .model_list
            .iter()
            .flatten()
            .map(|m| serde_json::json!({"id": m, "object": "model", "owned_by": "llmproxy"}))
            .collect();
        serde_json::json!({"object": "list", "data": data})
            .to_string()
            .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(models: &[Option<&[&str]>]) -> Config {
        let urls: Vec<String> = (0..models.len())
            .map(|i| format!("http://127.0.0.1:{}", 9000 + i))
            .collect();
        let mut c =
            Config::with_backends("127.0.0.1:0".parse().unwrap(), &urls).expect("valid config");
        for (b, m) in c.backends.iter_mut().zip(models) {
            b.models = m.map(|l| l.iter().map(|s| s.to_string()).collect());
        }
        c
    }

    #[test]
    fn model_routing() {
        let t = RouteTable::new(&cfg(&[Some(&["a"]), Some(&["a", "b"])]));
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[true, true]);
        assert_eq!(t.backends_for(Some("b")).unwrap(), &[false, true]);
        assert!(matches!(
            t.backends_for(Some("c")),
            Err(ProxyError::UnknownModel(_))
        ));
        assert_eq!(t.backends_for(None).unwrap(), &[true, true]);
        assert_eq!(t.model_list.as_deref().unwrap(), &["a", "b"]);
    }

    #[test]
    fn backends_without_models_serve_anything() {
        let t = RouteTable::new(&cfg(&[Some(&["a"]), None]));
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[true, true]);
        assert_eq!(t.backends_for(Some("zzz")).unwrap(), &[false, true]);
        assert!(t.model_list.is_none());
        assert_eq!(t.local("GET", "/v1/models", true), None);
    }
}
