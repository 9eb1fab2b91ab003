//! `/mock/stats` and `/mock/control`: how a test observes the mock and steers it at run time
//! (health and failure statuses, resets of every Nth request, context limit, engine gauges).
//!
//! A bad value answers 400: `context_limit` and `engine` apply as they are read, the statuses and
//! `reset_every` only when all three are valid. Only this runtime's `Cell`s change: each mock is
//! steered on its own, and nothing here touches the connection.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::{exchange::Exchange, state::Server, wire::Reply, EngineKnobs};

pub(super) fn stats_json(server: &Server) -> Value {
    let s = &server.stats;
    json!({
        "requests": s.requests.load(Ordering::Relaxed),
        "active": s.active.load(Ordering::Relaxed),
        "disconnects": s.disconnects.load(Ordering::Relaxed),
        "last_disconnect_unix_ms": s.last_disconnect_unix_ms.load(Ordering::Relaxed),
        "completed": s.completed.load(Ordering::Relaxed),
        "connections": s.connections.load(Ordering::Relaxed),
        "port": server.port,
    })
}

/// `POST /mock/control`: `{"health_status": 503, "fail_status": 500, "reset_every": 2}`; absent
/// keys stay as they are, `null` clears. Engine gauges: `{"engine": {"waiting": 3, "running": 2,
/// "kv_usage": 0.5, "hang": true, "max_running": 8}}` (`running: null` reports the requests being
/// served; `max_running` makes the mock an engine with that batch size, see `state::Batch`).
/// `{"context_limit": N}` answers longer requests with vLLM's context-length error.
pub(super) fn control(ex: &Exchange, server: &Server) -> Reply {
    let body: Value = match serde_json::from_slice(&ex.body) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => return Reply::error(400, "control body must be a JSON object"),
    };
    match body.get("context_limit") {
        None => {}
        Some(Value::Null) => server.context_limit.set(None),
        Some(v) => match v.as_u64() {
            Some(n) => server.context_limit.set(Some(n)),
            None => return Reply::error(400, "context_limit must be a token count or null"),
        },
    }
    if let Some(engine) = body.get("engine") {
        match engine_knobs(engine, server.engine.get()) {
            Ok(k) => {
                server.engine.set(k);
                // A larger batch may admit waiting generations now.
                server.batch.wake_front();
            }
            Err(e) => return Reply::error(400, &e),
        }
    }
    let parse = |key: &str| -> Result<Option<Option<u16>>, String> {
        match body.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => match v.as_u64() {
                Some(code) if (100..=599).contains(&code) => Ok(Some(u16::try_from(code).ok())),
                _ => Err(format!("{key} must be an HTTP status or null")),
            },
        }
    };
    let reset = match body.get("reset_every") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(0)),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| "reset_every must be a count or null".to_string()),
    };
    let (health, fail, reset) = match (parse("health_status"), parse("fail_status"), reset) {
        (Ok(h), Ok(f), Ok(r)) => (h, f, r),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Reply::error(400, &e),
    };
    if let Some(h) = health {
        server.health_status.set(h);
    }
    if let Some(f) = fail {
        server.fail_status.set(f);
    }
    if let Some(n) = reset {
        server.reset_every.set(n);
        server.inference_seen.set(0);
    }
    Reply::json(200, &json!({}))
}

/// Applies the keys present in `v` to `k`.
fn engine_knobs(v: &Value, mut k: EngineKnobs) -> Result<EngineKnobs, String> {
    let Value::Object(map) = v else {
        return Err("engine must be a JSON object".into());
    };
    for (key, val) in map {
        let num = || {
            val.as_f64()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("engine.{key} must be a non-negative number"))
        };
        match key.as_str() {
            "waiting" => k.waiting = num()?,
            "running" if val.is_null() => k.running = None,
            "running" => k.running = Some(num()?),
            "kv_usage" => k.kv_usage = num()?,
            "max_running" => k.max_running = num()?.floor(),
            "hang" => {
                k.hang = val
                    .as_bool()
                    .ok_or_else(|| "engine.hang must be true or false".to_string())?
            }
            other => return Err(format!("unknown engine key \"{other}\"")),
        }
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_knobs_apply_present_keys_only() {
        let base = EngineKnobs::default();
        let k = engine_knobs(&json!({"waiting": 3, "running": 2}), base).expect("knobs");
        assert_eq!((k.waiting, k.running, k.kv_usage), (3.0, Some(2.0), 0.0));
        let k = engine_knobs(&json!({"running": null, "hang": true}), k).expect("knobs");
        assert_eq!((k.waiting, k.running, k.hang), (3.0, None, true));
        let k = engine_knobs(&json!({"max_running": 8}), k).expect("knobs");
        assert_eq!((k.max_running, k.waiting), (8.0, 3.0));
        assert!(engine_knobs(&json!({"waiting": -1}), base).is_err());
        assert!(engine_knobs(&json!({"speed": 1}), base).is_err());
        assert!(engine_knobs(&json!([]), base).is_err());
    }
}
