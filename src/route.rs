//! Where a request goes: answered locally (health, metrics, model list) or to the set of
//! backends that serve its model. One table is built per backend-table version (`backends`), off
//! the cores, and only read afterwards.

use std::collections::HashMap;

use crate::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Health,
    Metrics,
    Models,
    /// `/metrics` asked on the main listener while an admin listener serves it: never proxied
    /// (that would expose a backend's own metrics), answered 404.
    MetricsElsewhere,
    /// `POST /admin/reload`: re-read the config file.
    Reload,
    /// An admin action asked on the main listener while an admin listener exists: 404.
    AdminElsewhere,
}

pub struct RouteTable {
    /// Backends eligible for each configured model (including backends that serve any model).
    by_model: HashMap<String, Vec<bool>>,
    /// Backends without a `models` list.
    any_model: Vec<bool>,
    /// Some configured entry serves any model (even if none of its backends exists right now).
    serves_any: bool,
    all: Vec<bool>,
    /// The union of configured models, when every backend declares its models.
    pub model_list: Option<Vec<String>>,
}

impl RouteTable {
    /// Masks over `slots` backend slots from the eligible backends and their `models` lists
    /// (`None` = serves any model). Slots not listed (free or draining) are never eligible.
    /// Which models exist comes from the configured entries (`configured`), not from the
    /// backends present: a configured model whose replicas are all gone is a 503, not a 404.
    pub fn build<'a>(
        slots: usize,
        backends: impl Iterator<Item = (usize, Option<&'a [String]>)>,
        configured: impl Iterator<Item = Option<&'a [String]>>,
    ) -> Self {
        let backends: Vec<(usize, Option<&[String]>)> =
            backends.filter(|(i, _)| *i < slots).collect();
        let mut any_model = vec![false; slots];
        let mut all = vec![false; slots];
        for (i, models) in &backends {
            all[*i] = true;
            any_model[*i] = models.is_none();
        }
        let mut by_model: HashMap<String, Vec<bool>> = HashMap::new();
        let mut serves_any = false;
        for models in configured {
            match models {
                None => serves_any = true,
                Some(list) => {
                    for m in list {
                        by_model
                            .entry(m.clone())
                            .or_insert_with(|| any_model.clone());
                    }
                }
            }
        }
        for (i, models) in &backends {
            for m in models.iter().copied().flatten() {
                by_model
                    .entry(m.clone())
                    .or_insert_with(|| any_model.clone())[*i] = true;
            }
        }
        let model_list = if serves_any {
            None
        } else {
            let mut names: Vec<String> = by_model.keys().cloned().collect();
            names.sort();
            Some(names)
        };
        RouteTable {
            by_model,
            any_model,
            serves_any,
            all,
            model_list,
        }
    }

    /// Which backends may serve a request for `model`.
    pub fn backends_for(&self, model: Option<&str>) -> Result<&[bool], ProxyError> {
        match model {
            None => Ok(&self.all),
            Some(m) => match self.by_model.get(m) {
                Some(mask) => Ok(mask),
                None if self.serves_any => Ok(&self.any_model),
                None => Err(ProxyError::UnknownModel(m.to_string())),
            },
        }
    }

    /// Endpoints the proxy answers itself. `/metrics` moves to the admin listener when one is set.
    pub fn local(&self, method: &str, path: &str, metrics_here: bool) -> Option<Local> {
        if path == "/admin/reload" {
            return Some(if method == "POST" && metrics_here {
                Local::Reload
            } else {
                Local::AdminElsewhere
            });
        }
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

    fn table(models: &[Option<&[&str]>]) -> RouteTable {
        let lists: Vec<Option<Vec<String>>> = models
            .iter()
            .map(|m| m.map(|l| l.iter().map(|s| s.to_string()).collect()))
            .collect();
        RouteTable::build(
            lists.len(),
            lists.iter().enumerate().map(|(i, m)| (i, m.as_deref())),
            lists.iter().map(|m| m.as_deref()),
        )
    }

    #[test]
    fn unlisted_slots_are_never_eligible() {
        let a = ["a".to_string()];
        let t = RouteTable::build(
            3,
            [(0, Some(&a[..])), (2, None)].into_iter(),
            [Some(&a[..]), None].into_iter(),
        );
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[true, false, true]);
        assert_eq!(t.backends_for(Some("x")).unwrap(), &[false, false, true]);
        assert_eq!(t.backends_for(None).unwrap(), &[true, false, true]);
    }

    #[test]
    fn configured_models_without_backends_are_known_but_have_none() {
        let a = ["a".to_string()];
        let t = RouteTable::build(1, std::iter::empty(), [Some(&a[..])].into_iter());
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[false]);
        assert!(t.backends_for(Some("b")).is_err());
        assert_eq!(t.model_list.as_deref().unwrap(), &["a"]);
        let t = RouteTable::build(0, std::iter::empty(), [None].into_iter());
        assert!(t.backends_for(Some("b")).unwrap().is_empty());
    }

    #[test]
    fn model_routing() {
        let t = table(&[Some(&["a"]), Some(&["a", "b"])]);
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
        let t = table(&[Some(&["a"]), None]);
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[true, true]);
        assert_eq!(t.backends_for(Some("zzz")).unwrap(), &[false, true]);
        assert!(t.model_list.is_none());
        assert_eq!(t.local("GET", "/v1/models", true), None);
    }
}
