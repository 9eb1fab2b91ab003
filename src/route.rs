//! Where a request goes: answered locally (health, metrics, model list) or to the set of
//! backends that serve its model — a model pool (`models:`) when one is configured for the name
//! or alias, with its own strategy, rewrite and fallbacks. The table is built once from config
//! and only read afterwards.

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

/// The backends a request may go to and what to do on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'t> {
    pub mask: &'t [bool],
    /// Index into `Config::models` when a pool serves the model.
    pub pool: Option<usize>,
    /// The `model` value the upstream body must carry instead of the client's.
    pub rewrite: Option<&'t str>,
}

struct PoolRoute {
    name: String,
    mask: Vec<bool>,
    fallbacks: Vec<usize>,
    rewrite: bool,
}

pub struct RouteTable {
    pools: Vec<PoolRoute>,
    /// Pool names and aliases → (pool, is an alias).
    pool_names: HashMap<String, (usize, bool)>,
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
        let mut pool_names = HashMap::new();
        let pools: Vec<PoolRoute> = cfg
            .models
            .iter()
            .enumerate()
            .map(|(i, p)| {
                pool_names.insert(p.name.clone(), (i, false));
                for a in &p.aliases {
                    pool_names.insert(a.clone(), (i, true));
                }
                let mask = match &p.backends {
                    Some(urls) => cfg.backends.iter().map(|b| urls.contains(&b.url)).collect(),
                    None => by_model.get(&p.name).unwrap_or(&any_model).clone(),
                };
                PoolRoute {
                    name: p.name.clone(),
                    mask,
                    fallbacks: p
                        .fallbacks
                        .iter()
                        .filter_map(|f| cfg.models.iter().position(|q| &q.name == f))
                        .collect(),
                    rewrite: p.rewrite,
                }
            })
            .collect();
        let model_list = if any_model.iter().any(|a| *a) {
            None
        } else {
            let mut names: Vec<String> =
                by_model.keys().chain(pool_names.keys()).cloned().collect();
            names.sort();
            names.dedup();
            Some(names)
        };
        RouteTable {
            pools,
            pool_names,
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

    /// Where a request for `model` goes: its pool if one serves the name or alias, else the
    /// backends that list the model (or serve any).
    pub fn route(&self, model: Option<&str>) -> Result<Route<'_>, ProxyError> {
        if let Some(&(p, alias)) = model.and_then(|m| self.pool_names.get(m)) {
            let pool = &self.pools[p];
            return Ok(Route {
                mask: &pool.mask,
                pool: Some(p),
                rewrite: (alias && pool.rewrite).then_some(pool.name.as_str()),
            });
        }
        Ok(Route {
            mask: self.backends_for(model)?,
            pool: None,
            rewrite: None,
        })
    }

    /// The pools to try, in order, when `pool` cannot serve.
    pub fn fallbacks(&self, pool: Option<usize>) -> &[usize] {
        pool.and_then(|p| self.pools.get(p))
            .map_or(&[], |p| p.fallbacks.as_slice())
    }

    /// The route of a fallback pool: its backends, and its own name in the body.
    pub fn fallback_route(&self, pool: usize) -> Option<Route<'_>> {
        let p = self.pools.get(pool)?;
        Some(Route {
            mask: &p.mask,
            pool: Some(pool),
            rewrite: Some(&p.name),
        })
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
    fn pools_aliases_and_fallbacks() {
        let mut c = cfg(&[Some(&["small"]), Some(&["big"]), Some(&["big"])]);
        let pool =
            |name: &str, aliases: &[&str], rewrite, backends: Option<&[&str]>, fb: &[&str]| {
                crate::config::ModelPool {
                    name: name.into(),
                    aliases: aliases.iter().map(|s| s.to_string()).collect(),
                    rewrite,
                    strategy: crate::config::Strategy::LeastLoad,
                    backends: backends.map(|l| l.iter().map(|s| s.to_string()).collect()),
                    fallbacks: fb.iter().map(|s| s.to_string()).collect(),
                }
            };
        c.models = vec![
            pool(
                "big",
                &["gpt-4"],
                false,
                Some(&["http://127.0.0.1:9002"]),
                &[],
            ),
            pool("small", &["gpt-3.5", "fast"], true, None, &["big"]),
        ];
        let t = RouteTable::new(&c);
        let r = t.route(Some("fast")).unwrap();
        assert_eq!(r.mask, &[true, false, false]);
        assert_eq!((r.pool, r.rewrite), (Some(1), Some("small")));
        assert_eq!(t.route(Some("small")).unwrap().rewrite, None);
        // No rewrite configured: the alias goes upstream as it is; backends narrowed.
        let r = t.route(Some("gpt-4")).unwrap();
        assert_eq!(
            (r.mask, r.pool, r.rewrite),
            (&[false, false, true][..], Some(0), None)
        );
        assert_eq!(t.fallbacks(Some(1)), &[0]);
        assert_eq!(t.fallbacks(Some(0)), &[] as &[usize]);
        assert_eq!(t.fallbacks(None), &[] as &[usize]);
        let f = t.fallback_route(0).unwrap();
        assert_eq!(
            (f.mask, f.rewrite),
            (&[false, false, true][..], Some("big"))
        );
        // Models outside pools keep routing as before.
        assert_eq!(t.route(None).unwrap().pool, None);
        assert!(t.route(Some("nope")).is_err());
        assert_eq!(
            t.model_list.as_deref().unwrap(),
            &["big", "fast", "gpt-3.5", "gpt-4", "small"]
        );
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
