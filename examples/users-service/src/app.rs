//! The HTTP endpoints and the three read paths (`none`, `naive`, `cachet`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use cachet::Cache;
use cachet::outbox::{Outbox, Relay};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::db::{Db, TENANTS, User};

/// Most ids one `GET /users?ids=…` takes.
const MAX_BATCH: usize = 1000;

/// How reads are cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Every read queries the database.
    None,
    /// `get`; on a miss, query and `set`. Writers update, then `invalidate`.
    Naive,
    /// `get_or_load` / `get_or_load_many`; writers invalidate after the commit
    /// (and record it in the transaction through the outbox on PostgreSQL).
    Cachet,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Naive => "naive",
            Self::Cachet => "cachet",
        }
    }
}

#[derive(Debug)]
struct Inner {
    db: Db,
    cache: Option<Cache<u64, User>>,
    mode: Mode,
    outbox: Option<Outbox>,
    relay: Option<Relay>,
    prometheus: PrometheusHandle,
}

/// The service's state, shared by the handlers.
#[derive(Clone, Debug)]
pub(crate) struct App(Arc<Inner>);

/// A handler's failure, answered as JSON `{"error": …}`.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl Failure {
    fn bad_request(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }

    fn not_found() -> Self {
        Self(StatusCode::NOT_FOUND, "not found".into())
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        json_response(self.0, &json!({ "error": self.1 }))
    }
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn ok_json(body: &impl serde::Serialize) -> Response {
    json_response(StatusCode::OK, body)
}

fn parse_id(raw: &str) -> Result<u64, Failure> {
    raw.parse()
        .map_err(|_| Failure::bad_request(format!("not a user id: {raw:?}")))
}

impl App {
    pub(crate) fn new(
        db: Db,
        cache: Option<Cache<u64, User>>,
        mode: Mode,
        outbox: Option<Outbox>,
        relay: Option<Relay>,
        prometheus: PrometheusHandle,
    ) -> Self {
        Self(Arc::new(Inner {
            db,
            cache,
            mode,
            outbox,
            relay,
            prometheus,
        }))
    }

    pub(crate) fn router(self) -> Router {
        Router::new()
            .route("/users", get(get_users))
            .route("/users/{id}", get(get_user))
            .route("/users/{id}/email", put(put_email))
            .route("/tenants/{tenant}/invalidate", post(invalidate_tenant))
            .route("/metrics", get(metrics))
            .route("/stats", get(stats))
            .with_state(self)
    }

    /// The cache, in the modes that have one.
    fn cache(&self) -> Option<&Cache<u64, User>> {
        self.0.cache.as_ref()
    }

    async fn user(&self, id: u64) -> Result<Option<User>, Failure> {
        let db = &self.0.db;
        match (self.0.mode, self.cache()) {
            (Mode::Cachet, Some(cache)) => {
                let db = db.clone();
                cache
                    .get_or_load(&id, move || async move { db.user(id).await })
                    .await
                    .map_err(Failure::internal)
            }
            (Mode::Naive, Some(cache)) => {
                if let Some(user) = cache.get(&id).await.map_err(Failure::internal)? {
                    return Ok(Some(user));
                }
                let user = db.user(id).await.map_err(Failure::internal)?;
                if let Some(user) = &user {
                    // No lease: a write that committed and deleted since the
                    // read above is overwritten by this older row.
                    cache
                        .set(&id, user.clone())
                        .await
                        .map_err(Failure::internal)?;
                }
                Ok(user)
            }
            _ => db.user(id).await.map_err(Failure::internal),
        }
    }

    async fn users(&self, ids: &[u64]) -> Result<Vec<Option<User>>, Failure> {
        let db = &self.0.db;
        match (self.0.mode, self.cache()) {
            (Mode::Cachet, Some(cache)) => {
                let db = db.clone();
                cache
                    .get_or_load_many(ids, move |missing| {
                        let db = db.clone();
                        async move { db.users(&missing).await }
                    })
                    .await
                    .map_err(Failure::internal)
            }
            (Mode::Naive, Some(cache)) => {
                let mut found = cache.get_many(ids).await.map_err(Failure::internal)?;
                let mut missing: Vec<u64> = ids
                    .iter()
                    .zip(&found)
                    .filter(|(_, user)| user.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                missing.sort_unstable();
                missing.dedup();
                if missing.is_empty() {
                    return Ok(found);
                }
                let loaded = db.users(&missing).await.map_err(Failure::internal)?;
                for user in loaded.values() {
                    cache
                        .set(&user.id, user.clone())
                        .await
                        .map_err(Failure::internal)?;
                }
                for (id, slot) in ids.iter().zip(found.iter_mut()) {
                    if slot.is_none() {
                        *slot = loaded.get(id).cloned();
                    }
                }
                Ok(found)
            }
            _ => {
                let mut distinct = ids.to_vec();
                distinct.sort_unstable();
                distinct.dedup();
                let loaded: HashMap<u64, User> =
                    db.users(&distinct).await.map_err(Failure::internal)?;
                Ok(ids.iter().map(|id| loaded.get(id).cloned()).collect())
            }
        }
    }

    async fn set_email(&self, id: u64, email: &str) -> Result<Option<User>, Failure> {
        let db = &self.0.db;
        let Some(cache) = self.cache() else {
            return db
                .set_email(id, email, None)
                .await
                .map_err(Failure::internal);
        };
        // On PostgreSQL in the cachet mode, the invalidation commits with the
        // UPDATE and the relay delivers it even if this process dies now.
        let key = cache.store_key(&id);
        let outbox = match self.0.mode {
            Mode::Cachet => self.0.outbox.as_ref().map(|o| (o, &key)),
            _ => None,
        };
        let user = db
            .set_email(id, email, outbox)
            .await
            .map_err(Failure::internal)?;
        if user.is_some() {
            // After the commit: the next read loads the new row, and in the
            // cachet mode a load that read the old row cannot fill.
            if let Err(e) = cache.invalidate(&id).await {
                tracing::warn!(error = %e, id, "invalidation after the write failed");
            }
        }
        Ok(user)
    }
}

async fn get_user(State(app): State<App>, Path(id): Path<String>) -> Result<Response, Failure> {
    let id = parse_id(&id)?;
    match app.user(id).await? {
        Some(user) => Ok(ok_json(&user)),
        None => Err(Failure::not_found()),
    }
}

/// `GET /users?ids=1,2,3`: users in the order asked, `null` for the missing.
async fn get_users(State(app): State<App>, RawQuery(query): RawQuery) -> Result<Response, Failure> {
    let query = query.unwrap_or_default();
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ids="))
        .ok_or_else(|| Failure::bad_request("expected ?ids=1,2,3"))?;
    let ids = raw
        .replace("%2C", ",")
        .replace("%2c", ",")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(parse_id)
        .collect::<Result<Vec<u64>, Failure>>()?;
    if ids.len() > MAX_BATCH {
        return Err(Failure::bad_request(format!(
            "at most {MAX_BATCH} ids per request, got {}",
            ids.len()
        )));
    }
    let users = app.users(&ids).await?;
    Ok(ok_json(&users))
}

#[derive(Debug, Deserialize)]
struct EmailBody {
    email: String,
}

async fn put_email(
    State(app): State<App>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let id = parse_id(&id)?;
    let body: EmailBody = serde_json::from_slice(&body)
        .map_err(|e| Failure::bad_request(format!("expected {{\"email\": \"...\"}}: {e}")))?;
    let email = body.email.trim();
    if email.is_empty() || email.len() > 254 {
        return Err(Failure::bad_request("email must have 1 to 254 bytes"));
    }
    match app.set_email(id, email).await? {
        Some(user) => Ok(ok_json(&user)),
        None => Err(Failure::not_found()),
    }
}

async fn invalidate_tenant(
    State(app): State<App>,
    Path(tenant): Path<String>,
) -> Result<Response, Failure> {
    let tenant: u64 = tenant
        .parse()
        .map_err(|_| Failure::bad_request(format!("not a tenant: {tenant:?}")))?;
    if tenant >= TENANTS {
        return Err(Failure::not_found());
    }
    if let Some(cache) = app.cache() {
        cache
            .invalidate_group(&tenant)
            .await
            .map_err(Failure::internal)?;
    }
    Ok(ok_json(
        &json!({ "tenant": tenant, "invalidated": app.cache().is_some() }),
    ))
}

async fn metrics(State(app): State<App>) -> Response {
    cachet::metrics::publish();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.0.prometheus.render(),
    )
        .into_response()
}

async fn stats(State(app): State<App>) -> Response {
    let db = &app.0.db;
    let cache: Value = match app.cache() {
        Some(cache) => {
            let s = cache.stats();
            json!({
                "hits": s.hits,
                "negative_hits": s.negative_hits,
                "misses": s.misses,
                "hit_rate": s.hit_rate(),
                "loads": s.loads,
                "load_errors": s.load_errors,
                "coalesced": s.coalesced,
                "fills": s.fills,
                "refused_fills": s.refused_fills,
                "lease_waits": s.lease_waits,
                "store_errors": s.store_errors,
                "pending_invalidations": s.pending_invalidations,
            })
        }
        None => Value::Null,
    };
    let relay: Value = match &app.0.relay {
        Some(relay) => {
            let s = relay.stats();
            json!({
                "delivered": s.delivered,
                "malformed": s.malformed,
                "failed_attempts": s.failed_attempts,
            })
        }
        None => Value::Null,
    };
    ok_json(&json!({
        "mode": app.0.mode.name(),
        "db_queries": db.queries(),
        "db_reads": db.reads(),
        "cache": cache,
        "outbox_relay": relay,
    }))
}
