//! Where a request goes: answered locally (health, metrics, model list) or to the set of
//! backends that serve its model — a model pool (`models:`) when one is configured for the name
//! or alias, with its own strategy, rewrite and fallbacks. One table is built per backend-table
//! version (`backends`), off the cores, and only read afterwards.

use std::collections::HashMap;

use crate::config::ModelPool;
use crate::error::ProxyError;

/// A backend that may take requests: its slot, the config entry it comes from (normalised URL)
/// and its `models` list.
pub(crate) type Eligible<'a> = (usize, &'a str, Option<&'a [String]>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Local {
    Health,
    /// `/ready`: the process is up, its config loaded and it is not draining (backends aside).
    Ready,
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

/// The backends a request may go to and what to do on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route<'t> {
    pub(crate) mask: &'t [bool],
    /// Index into `Config::models` when a pool serves the model.
    pub(crate) pool: Option<usize>,
    /// The `model` value the upstream body must carry instead of the client's.
    pub(crate) rewrite: Option<&'t str>,
}

struct PoolRoute {
    name: String,
    mask: Vec<bool>,
    fallbacks: Vec<usize>,
    rewrite: bool,
}

pub(crate) struct RouteTable {
    pools: Vec<PoolRoute>,
    /// Pool names and aliases → (pool, is an alias).
    pool_names: HashMap<String, (usize, bool)>,
    /// Backends eligible for each configured model (including backends that serve any model).
    by_model: HashMap<String, Vec<bool>>,
    /// Backends without a `models` list.
    any_model: Vec<bool>,
    /// Some configured entry serves any model (even if none of its backends exists right now).
    serves_any: bool,
    all: Vec<bool>,
    /// The union of configured models, when every backend declares its models.
    pub(crate) model_list: Option<Vec<String>>,
}

impl RouteTable {
    /// Masks over `slots` backend slots from the eligible backends (slot, the config entry they
    /// come from, their `models` list; `None` = serves any model). Slots not listed (free or
    /// draining) are never eligible. Which models exist comes from the configured entries
    /// (`configured`), not from the backends present: a configured model whose replicas are all
    /// gone is a 503, not a 404. A pool's `backends` list names config entries, so every address
    /// discovered for a listed entry is in the pool.
    pub(crate) fn build<'a>(
        slots: usize,
        backends: impl Iterator<Item = Eligible<'a>>,
        configured: impl Iterator<Item = Option<&'a [String]>>,
        pools: &[ModelPool],
    ) -> Self {
        let backends: Vec<Eligible<'a>> = backends.filter(|(i, _, _)| *i < slots).collect();
        let mut any_model = vec![false; slots];
        let mut all = vec![false; slots];
        for (i, _, models) in &backends {
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
        for (i, _, models) in &backends {
            for m in models.iter().copied().flatten() {
                by_model
                    .entry(m.clone())
                    .or_insert_with(|| any_model.clone())[*i] = true;
            }
        }
        let mut pool_names = HashMap::new();
        let pools: Vec<PoolRoute> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                pool_names.insert(p.name.clone(), (i, false));
                for a in &p.aliases {
                    pool_names.insert(a.clone(), (i, true));
                }
                let mask = match &p.backends {
                    Some(urls) => {
                        let mut mask = vec![false; slots];
                        for (slot, source, _) in &backends {
                            mask[*slot] = urls.iter().any(|u| u == source);
                        }
                        mask
                    }
                    None => by_model.get(&p.name).unwrap_or(&any_model).clone(),
                };
                PoolRoute {
                    name: p.name.clone(),
                    mask,
                    fallbacks: p
                        .fallbacks
                        .iter()
                        .filter_map(|f| pools.iter().position(|q| &q.name == f))
                        .collect(),
                    rewrite: p.rewrite,
                }
            })
            .collect();
        let model_list = if serves_any {
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
            serves_any,
            all,
            model_list,
        }
    }

    /// Which backends may serve a request for `model`.
    pub(crate) fn backends_for(&self, model: Option<&str>) -> Result<&[bool], ProxyError> {
        match model {
            None => Ok(&self.all),
            Some(m) => match self.by_model.get(m) {
                Some(mask) => Ok(mask),
                None if self.serves_any => Ok(&self.any_model),
                None => Err(ProxyError::UnknownModel(m.to_string())),
            },
        }
    }

    /// Where a request for `model` goes: its pool if one serves the name or alias, else the
    /// backends that list the model (or serve any).
    pub(crate) fn route(&self, model: Option<&str>) -> Result<Route<'_>, ProxyError> {
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
    pub(crate) fn fallbacks(&self, pool: Option<usize>) -> &[usize] {
        pool.and_then(|p| self.pools.get(p))
            .map_or(&[], |p| p.fallbacks.as_slice())
    }

    /// The route of a fallback pool: its backends, and its own name in the body.
    pub(crate) fn fallback_route(&self, pool: usize) -> Option<Route<'_>> {
        let p = self.pools.get(pool)?;
        Some(Route {
            mask: &p.mask,
            pool: Some(pool),
            rewrite: Some(&p.name),
        })
    }

    /// Endpoints the proxy answers itself. `/metrics` moves to the admin listener when one is set.
    pub(crate) fn local(&self, method: &str, path: &str, metrics_here: bool) -> Option<Local> {
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
            "/ready" => Some(Local::Ready),
            "/metrics" if metrics_here => Some(Local::Metrics),
            "/metrics" => Some(Local::MetricsElsewhere),
            "/v1/models" if self.model_list.is_some() => Some(Local::Models),
            _ => None,
        }
    }

    pub(crate) fn models_body(&self) -> Vec<u8> {
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

    /// Backend `i` comes from entry `http://127.0.0.1:900i`.
    fn with_pools(models: &[Option<&[&str]>], pools: &[ModelPool]) -> RouteTable {
        let lists: Vec<Option<Vec<String>>> = models
            .iter()
            .map(|m| m.map(|l| l.iter().map(|s| s.to_string()).collect()))
            .collect();
        let urls: Vec<String> = (0..lists.len())
            .map(|i| format!("http://127.0.0.1:900{i}"))
            .collect();
        RouteTable::build(
            lists.len(),
            lists
                .iter()
                .enumerate()
                .map(|(i, m)| (i, urls[i].as_str(), m.as_deref())),
            lists.iter().map(|m| m.as_deref()),
            pools,
        )
    }

    fn table(models: &[Option<&[&str]>]) -> RouteTable {
        with_pools(models, &[])
    }

    #[test]
    fn unlisted_slots_are_never_eligible() {
        let a = ["a".to_string()];
        let t = RouteTable::build(
            3,
            [(0, "x", Some(&a[..])), (2, "y", None)].into_iter(),
            [Some(&a[..]), None].into_iter(),
            &[],
        );
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[true, false, true]);
        assert_eq!(t.backends_for(Some("x")).unwrap(), &[false, false, true]);
        assert_eq!(t.backends_for(None).unwrap(), &[true, false, true]);
    }

    #[test]
    fn configured_models_without_backends_are_known_but_have_none() {
        let a = ["a".to_string()];
        let t = RouteTable::build(1, std::iter::empty(), [Some(&a[..])].into_iter(), &[]);
        assert_eq!(t.backends_for(Some("a")).unwrap(), &[false]);
        assert!(t.backends_for(Some("b")).is_err());
        assert_eq!(t.model_list.as_deref().unwrap(), &["a"]);
        let t = RouteTable::build(0, std::iter::empty(), [None].into_iter(), &[]);
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
    fn pools_aliases_and_fallbacks() {
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
        let pools = vec![
            pool(
                "big",
                &["gpt-4"],
                false,
                Some(&["http://127.0.0.1:9002"]),
                &[],
            ),
            pool("small", &["gpt-3.5", "fast"], true, None, &["big"]),
        ];
        let t = with_pools(&[Some(&["small"]), Some(&["big"]), Some(&["big"])], &pools);
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
    fn a_pool_listing_a_discovered_entry_holds_every_address_of_it() {
        let pool = ModelPool {
            name: "m".into(),
            aliases: Vec::new(),
            rewrite: false,
            strategy: crate::config::Strategy::LeastLoad,
            backends: Some(vec!["http://svc:8000".into()]),
            fallbacks: Vec::new(),
        };
        // Slots 0 and 2 are two addresses of the discovered entry; slot 1 another entry; slot 3
        // is free.
        let t = RouteTable::build(
            4,
            [
                (0, "http://svc:8000", None),
                (1, "http://other:8000", None),
                (2, "http://svc:8000", None),
            ]
            .into_iter(),
            [None, None].into_iter(),
            &[pool],
        );
        let r = t.route(Some("m")).unwrap();
        assert_eq!(r.mask, &[true, false, true, false]);
        assert_eq!(r.pool, Some(0));
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
