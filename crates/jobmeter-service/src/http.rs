//! HTTP: `/metrics` (Prometheus text format), `/healthz` (liveness),
//! `/readyz` (ready when the accounts table is loaded, partitions are
//! assigned and their state restored) and the usage API under `/v1` (see
//! [`super::api`]).

use super::api::{AccountQuery, AccountView, Answer, Api, OPENAPI};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, IntCounterVec, Registry, TextEncoder};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    ready: Arc<AtomicBool>,
    failing: super::engine::FailingPartitions,
    api: Arc<Api>,
    requests: IntCounterVec,
}

/// Who asked, for the audit log: `sha256:` and the first 12 hex digits of
/// the bearer token's digest (never the token), or `none`.
fn token_id(h: &HeaderMap) -> String {
    use sha2::{Digest, Sha256};
    match authorization(h)
        .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(t) => {
            let d = Sha256::digest(t.as_bytes());
            let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
        None => "none".to_owned(),
    }
}

/// Counts the answer by route and status; refused requests (401, 403) and
/// every write are logged with the token's id, the route and the outcome.
fn reply(s: &AppState, route: &str, h: &HeaderMap, a: Answer) -> Response {
    s.requests.with_label_values(&[route, &a.status.to_string()]).inc();
    if matches!(a.status, 401 | 403) {
        tracing::info!(
            target: "jobmeter_audit",
            route,
            token = %token_id(h),
            status = a.status,
            error = a.body.get("error").and_then(|v| v.as_str()).unwrap_or(""),
            "api request refused"
        );
    }
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(a.body)).into_response();
    if a.status == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    r
}

fn authorization(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

async fn rate_card(State(s): State<AppState>, h: HeaderMap) -> Response {
    let a = match s.api.authenticate(authorization(&h)) {
        Ok(_) => s.api.rate_card(),
        Err(a) => a,
    };
    reply(&s, "rate_card", &h, a)
}

async fn model(State(s): State<AppState>, Path(m): Path<String>, h: HeaderMap) -> Response {
    let a = match s.api.authenticate(authorization(&h)) {
        Ok(_) => s.api.model(&m),
        Err(a) => a,
    };
    reply(&s, "model", &h, a)
}

async fn account(s: AppState, account: String, q: AccountQuery, h: HeaderMap, what: AccountView) -> Response {
    let route = what.name();
    let a = match s.api.authenticate(authorization(&h)) {
        Ok(scope) => {
            let api = s.api.clone();
            tokio::task::spawn_blocking(move || api.account(&scope, &account, what, &q))
                .await
                .unwrap_or_else(|e| Answer {
                    status: 500,
                    body: serde_json::json!({"error": "internal", "message": e.to_string()}),
                })
        }
        Err(a) => a,
    };
    reply(&s, route, &h, a)
}

async fn usage(
    State(s): State<AppState>,
    Path(a): Path<String>,
    Query(q): Query<AccountQuery>,
    h: HeaderMap,
) -> Response {
    account(s, a, q, h, AccountView::Usage).await
}

async fn limits(
    State(s): State<AppState>,
    Path(a): Path<String>,
    Query(q): Query<AccountQuery>,
    h: HeaderMap,
) -> Response {
    account(s, a, q, h, AccountView::Limits).await
}

async fn admission(
    State(s): State<AppState>,
    Path(a): Path<String>,
    Query(q): Query<AccountQuery>,
    h: HeaderMap,
) -> Response {
    account(s, a, q, h, AccountView::Admission).await
}

async fn adjustments(
    State(s): State<AppState>,
    Path(a): Path<String>,
    Query(q): Query<AccountQuery>,
    h: HeaderMap,
) -> Response {
    account(s, a, q, h, AccountView::Adjustments).await
}

async fn credits(
    State(s): State<AppState>,
    Path(a): Path<String>,
    Query(q): Query<AccountQuery>,
    h: HeaderMap,
) -> Response {
    account(s, a, q, h, AccountView::Credits).await
}

/// `POST /v1/accounts/{account}/adjustments`: a support token writes one
/// adjustment. Every call with a valid token is logged with the token's id
/// (never the token) and its outcome; a refused one is logged by
/// [`reply`].
async fn write_adjustment(
    State(s): State<AppState>,
    Path(account): Path<String>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let a = match s.api.authenticate(authorization(&h)) {
        Ok(scope) => {
            let api = s.api.clone();
            let (acct, scope2) = (account.clone(), scope.clone());
            let checked = tokio::task::spawn_blocking(move || api.adjustment_to_write(&scope2, &acct, &body))
                .await
                .unwrap_or_else(|e| {
                    Err(Answer {
                        status: 500,
                        body: serde_json::json!({"error": "internal", "message": e.to_string()}),
                    })
                });
            let answer = match checked {
                Ok((adj, raw)) => s.api.write_adjustment(&adj, &raw).await,
                Err(answer) => answer,
            };
            tracing::info!(
                target: "jobmeter_audit",
                route = "adjustments_write",
                token = %token_id(&h),
                account = %account,
                scope = scope.name(),
                status = answer.status,
                adjustment_id = answer.body.get("adjustment_id").and_then(|v| v.as_str()).unwrap_or(""),
                error = answer.body.get("error").and_then(|v| v.as_str()).unwrap_or(""),
                "adjustment write"
            );
            answer
        }
        Err(a) => a,
    };
    reply(&s, "adjustments_write", &h, a)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"error": "not_found", "message": "no such route; see /v1/openapi.json"})),
    )
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            buf,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let failing = s
        .failing
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if !failing.is_empty() {
        // Every other partition is metered; these are not.
        let mut body = String::from("not ready: partitions not metered, each with the reason (stored state that cannot be decoded: recover with `jobmeter rebuild`; `billing_cycle refused`: put the schedule back or date the change later, then restart):\n");
        for (p, why) in failing {
            body.push_str(&format!("partition {p}: {why}\n"));
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    } else if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: restoring state or waiting for partitions\n".to_owned(),
        )
    }
}

/// The router. Its routes are [`super::api::ROUTES`].
pub fn router(
    registry: Registry,
    ready: Arc<AtomicBool>,
    failing: super::engine::FailingPartitions,
    api: Arc<Api>,
    requests: IntCounterVec,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/rate-card", get(rate_card))
        .route("/v1/models/{model}", get(model))
        .route("/v1/accounts/{account_id}/usage", get(usage))
        .route("/v1/accounts/{account_id}/limits", get(limits))
        .route("/v1/accounts/{account_id}/admission", get(admission))
        .route(
            "/v1/accounts/{account_id}/adjustments",
            get(adjustments).post(write_adjustment),
        )
        .route("/v1/accounts/{account_id}/credits", get(credits))
        .fallback(not_found)
        .with_state(AppState {
            registry,
            ready,
            failing,
            api,
            requests,
        })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: tokio_util::sync::CancellationToken) {
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}
