//! The HTTP side of port 8001: health, readiness, discovery, and the
//! WebSocket upgrade of every route. Refusals answer with a JSON body that
//! says exactly why, and are logged the same way.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use axum::{
    extract::{
        ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade},
        ConnectInfo, State,
    },
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use bridge_proto as proto;
use serde_json::json;
use tracing::{info, warn};

use crate::{
    capacity, console,
    ids::ConnId,
    listener::{self, PeerInfo},
    policy::{auth, breaker::BreakerState, forwarded, ratelimit::retry_after_ms},
    session::{self, SessionStart},
    sse,
    state::AppState,
};

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/routes", get(routes))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .merge(console::routes(state.console_enabled()))
        .fallback(on_route)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            listener::extend_deadline,
        ))
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    if app.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else if app.draining.is_cancelled() {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the router is shutting down",
            json!({}),
        )
    } else if app.capacity.is_full() {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "at_capacity",
            &format!(
                "the router reached its limit of {} connections; ready again at {}",
                app.capacity.max(),
                app.capacity.low_water()
            ),
            json!({
                "max_connections": app.capacity.max(),
                "connections": app.capacity.sessions(),
                "low_water": app.capacity.low_water(),
            }),
        )
    } else {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "the router is starting",
            json!({}),
        )
    }
}

/// Discovery: every route with its policies, what it accepts (`types`, from
/// its live workers' announcements, and `allowed_types`), its live workers,
/// and warnings about workers whose service no route uses.
async fn routes(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let table = app.route_table();
    let snapshot = app.bridge.snapshot().await;
    let now = tokio::time::Instant::now();
    let routes: Vec<_> = table
        .routes()
        .iter()
        .map(|r| {
            let runtime = app.runtimes.peek(&r.path);
            let serving: Vec<_> = snapshot
                .workers
                .iter()
                .filter(|w| w.services.iter().any(|s| s == &r.service))
                .collect();
            // What the live workers announced together; unknown (null) as
            // soon as one of them did not announce its types.
            let types: Option<BTreeSet<&str>> = serving
                .iter()
                .filter(|w| !w.draining)
                .try_fold(BTreeSet::new(), |mut all, w| {
                    all.extend(w.msg_types.as_ref()?.iter().map(String::as_str));
                    Some(all)
                });
            let allowed_types: Option<BTreeSet<&String>> =
                r.allowed_types.as_ref().map(|a| a.iter().collect());
            let workers: Vec<_> = serving
                .iter()
                .map(|w| json!({ "id": w.id, "in_flight": w.in_flight, "capacity": w.capacity, "draining": w.draining, "sdk": w.sdk, "types": w.msg_types }))
                .collect();
            json!({
                "path": r.path,
                "service": r.service,
                "description": r.description,
                "capabilities": r.capabilities,
                "python_module": r.python_module,
                "types": types,
                "allowed_types": allowed_types,
                "raw": r.raw,
                "dynamic": r.dynamic,
                "binary": r.binary,
                "affinity": r.affinity,
                "request_timeout_ms": r.request_timeout.as_millis() as u64,
                "max_message_bytes": r.max_message_bytes,
                "max_in_flight": r.max_in_flight,
                "live_workers": workers.iter().filter(|w| w["draining"] == false).count(),
                "connections": runtime.as_ref().map_or(0, |rt| rt.connections()),
                "breaker": runtime.as_ref().map_or("closed", |rt| rt.breaker.state(now).as_str()),
                "workers": workers,
            })
        })
        .collect();
    let warnings: Vec<_> = snapshot
        .workers
        .iter()
        .flat_map(|w| w.services.iter().map(move |s| (w, s)))
        .filter_map(|(w, s)| {
            let why = table.unrouted(s)?;
            Some(json!({ "worker": w.id, "service": s, "message": why }))
        })
        .collect();
    // With a cluster: every router alive and its live workers per service.
    let cluster = app.cluster.as_ref().map(
        |c| json!({ "router_id": app.hub.router_id(), "up": c.is_up(), "routers": c.members() }),
    );
    Json(
        json!({ "routes": routes, "connections": app.hub.len(), "warnings": warnings, "cluster": cluster }),
    )
}

/// Prometheus (OpenMetrics text) exposition. Gauges that mirror state held
/// elsewhere (breakers, workers) are refreshed at scrape time.
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let now = tokio::time::Instant::now();
    for r in app.route_table().routes() {
        let state = app
            .runtimes
            .peek(&r.path)
            .map_or(0, |rt| match rt.breaker.state(now) {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            });
        app.metrics.set_breaker(&r.path, state);
    }
    let snapshot = app.bridge.snapshot().await;
    let mut per_service: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for w in &snapshot.workers {
        for s in &w.services {
            let e = per_service.entry(s.clone()).or_default();
            e.0 += i64::from(!w.draining);
            e.1 += i64::from(w.in_flight);
        }
    }
    let rows: Vec<(String, i64, i64)> = per_service
        .into_iter()
        .map(|(s, (live, in_flight))| (s, live, in_flight))
        .collect();
    app.metrics.set_workers(&rows);
    app.metrics.set_capacity(app.capacity_figures());
    if let Some(c) = &app.cluster {
        use std::sync::atomic::Ordering::Relaxed;
        app.metrics.set_cluster(crate::metrics::ClusterFigures {
            up: c.is_up(),
            members: c.members().len(),
            relayed: c.relayed.load(Relaxed),
            received: c.received.load(Relaxed),
            unrelayed: c.unrelayed.load(Relaxed) + app.hub.relay_dropped.load(Relaxed),
        });
    }
    let (parked, parked_bytes) = app.parked_figures();
    app.metrics
        .set_resume_parked(parked, parked_bytes, app.kept.used());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Counters for humans and dashboards.
async fn stats(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let snapshot = app.bridge.snapshot().await;
    let mut routes = serde_json::Map::new();
    let (mut total_in, mut total_out, mut total_requests, mut total_errors) = (0, 0, 0, 0);
    for (route, c) in app.metrics.routes_counters() {
        let (i, o, r, e) = (
            c.messages_in.load(Relaxed),
            c.messages_out.load(Relaxed),
            c.requests.load(Relaxed),
            c.errors.load(Relaxed),
        );
        total_in += i;
        total_out += o;
        total_requests += r;
        total_errors += e;
        routes.insert(
            route,
            json!({
                "connections": c.connections.load(Relaxed),
                "messagesIn": i,
                "messagesOut": o,
                "requests": r,
                "errors": e,
            }),
        );
    }
    let (parked, parked_bytes) = app.parked_figures();
    Json(json!({
        "connections": app.hub.len(),
        "totalMessages": total_in + total_out,
        "messagesIn": total_in,
        "messagesOut": total_out,
        "requests": total_requests,
        "errors": total_errors,
        // Share of client messages answered with an error frame.
        "errorRate": if total_in == 0 { 0.0 } else { total_errors as f64 / total_in as f64 },
        "routes": routes,
        "endpoints": {
            "bridge": app.endpoints.bridge,
            "publish": app.endpoints.publish,
            "workers": snapshot.workers,
        },
        "config": app.metrics.config_status(),
        "draining": app.draining.is_cancelled(),
        "capacity": capacity_stats(&app),
        "cluster": app.cluster.as_ref().map(|c| c.stats()),
        "tls": app.tls.as_ref().map(|t| t.status()),
        "resume": {
            "parked": parked,
            "parkedBytes": parked_bytes,
            "reservedBytes": app.lot.stats().reserved_bytes,
            "keptBytes": app.kept.used(),
            "budgetBytes": app.settings.resume_max_bytes,
        },
    }))
}

fn capacity_stats(app: &AppState) -> serde_json::Value {
    let c = app.capacity_figures();
    json!({
        "maxConnections": c.max_connections,
        "sessions": c.sessions,
        "full": c.full,
        "lowWater": app.capacity.low_water(),
        "refused": app.capacity.refused(),
        "tcpOpen": c.tcp_open,
        "tcpPending": c.tcp_pending,
        "tcpEvicted": app.tracker.stats().evicted,
        "descriptorLimit": c.descriptor_limit,
    })
}

/// `503 at_capacity`: with `Retry-After`, and `Connection: close` so the
/// refused client gives its descriptor back at once.
fn at_capacity(app: &AppState) -> Response {
    let retry_after = capacity::RETRY_AFTER;
    let mut response = refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "at_capacity",
        &format!(
            "the router is at its limit of {} connections; try again later or elsewhere",
            app.capacity.max()
        ),
        json!({
            "max_connections": app.capacity.max(),
            "retry_after_ms": retry_after.as_millis() as u64,
        }),
    );
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(retry_after.as_secs().max(1)),
    );
    headers.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// A refusal: status, stable error code, human message, extra fields.
fn refuse(status: StatusCode, code: &str, message: &str, extra: serde_json::Value) -> Response {
    let mut body = json!({ "error": code, "message": message });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    (status, Json(body)).into_response()
}

/// Everything that is not one of the router's own endpoints: a route's
/// WebSocket upgrade or event stream (`GET`), a frame for an SSE session
/// (`POST`), the end of an SSE session (`DELETE`), a CORS preflight
/// (`OPTIONS`).
async fn on_route(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    request: axum::extract::Request,
) -> Response {
    use axum::extract::FromRequestParts;
    let (mut parts, body) = request.into_parts();
    let origin = parts
        .headers
        .get(axum::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = parts.uri.path().to_owned();
    let mut response = match parts.method {
        axum::http::Method::OPTIONS => preflight(&app, &path, origin.as_deref()),
        axum::http::Method::POST => post(&app, &path, &parts.headers, body).await,
        axum::http::Method::DELETE => end_session(&app, &path, &parts.headers),
        _ => {
            let ws = WebSocketUpgrade::from_request_parts(&mut parts, &app).await;
            upgrade(app.clone(), peer, parts.uri, parts.headers, ws).await
        }
    };
    allow_origin(&app, &path, origin.as_deref(), &mut response);
    response
}

/// CORS for pages of other origins, as the route's `allowedOrigins` allow.
fn allow_origin(app: &AppState, path: &str, origin: Option<&str>, response: &mut Response) {
    let Some(origin) = origin else { return };
    let table = app.route_table();
    let Some(found) = table.find(path) else {
        return;
    };
    if auth::check_origin(found.route.allowed_origins.as_deref(), Some(origin)).is_err() {
        return;
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(origin) {
        let h = response.headers_mut();
        h.insert(axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.insert(
            axum::http::header::VARY,
            axum::http::HeaderValue::from_static("Origin"),
        );
    }
}

/// The answer to a CORS preflight of a route (the custom headers of the
/// HTTP fallback included).
fn preflight(app: &AppState, path: &str, origin: Option<&str>) -> Response {
    let table = app.route_table();
    let allowed = table
        .find(path)
        .is_some_and(|f| auth::check_origin(f.route.allowed_origins.as_deref(), origin).is_ok());
    if !allowed {
        return StatusCode::FORBIDDEN.into_response();
    }
    (
        StatusCode::NO_CONTENT,
        [
            (
                axum::http::header::ACCESS_CONTROL_ALLOW_METHODS,
                "GET, POST, DELETE",
            ),
            (
                axum::http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Content-Type, Authorization, X-Session-Id, X-Resume-Token, X-Post-Seq, Last-Event-ID",
            ),
            (axum::http::header::ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response()
}

/// The SSE session a `POST` or `DELETE` names (`X-Session-Id`,
/// `X-Resume-Token`), with the largest frame its route takes; or the
/// refusal (404 no route, 401 not a live event stream of this token).
fn sse_session(
    app: &AppState,
    path: &str,
    headers: &HeaderMap,
) -> Result<(Arc<sse::Upstream>, usize), sse::PostError> {
    let unauthorized = |message: &str| sse::PostError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: message.to_owned(),
        index: None,
    };
    let table = app.route_table();
    let Some(found) = table.find(path) else {
        return Err(sse::PostError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_route",
            message: format!("no route serves {path}"),
            index: None,
        });
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(session), Some(token)) = (header("x-session-id"), header("x-resume-token")) else {
        return Err(unauthorized(
            "send X-Session-Id and X-Resume-Token from the session's welcome",
        ));
    };
    if !app.lot.owns(session, token) {
        return Err(unauthorized("no live session with this id and token"));
    }
    let Some(upstream) = app.sse.upstream(session) else {
        return Err(unauthorized(
            "the session has no event stream open: open one (GET) first",
        ));
    };
    if !upstream.carries(token) {
        return Err(unauthorized(
            "this token is of an earlier connection of the session: use the one its resumed event gave",
        ));
    }
    Ok((upstream, found.route.max_message_bytes))
}

/// `DELETE <route>`: ends an SSE session as a WebSocket close 1000 would
/// (README, "HTTP fallback"): 204, then the stream's `close` event.
fn end_session(app: &AppState, path: &str, headers: &HeaderMap) -> Response {
    match sse_session(app, path, headers) {
        Ok((upstream, _)) if upstream.end() => StatusCode::NO_CONTENT.into_response(),
        Ok(_) => sse::PostError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: "the session has more frames waiting than it reads: retry later".into(),
            index: None,
        }
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST <route>`: frames for an SSE session (README, "HTTP fallback").
async fn post(app: &AppState, path: &str, headers: &HeaderMap, body: axum::body::Body) -> Response {
    let (upstream, max_frame) = match sse_session(app, path, headers) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let seq = match headers
        .get("x-post-seq")
        .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()))
    {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            return sse::PostError {
                status: StatusCode::BAD_REQUEST,
                code: "bad_request",
                message: "X-Post-Seq is a whole number".into(),
                index: None,
            }
            .into_response()
        }
    };
    // A body holds a few frames at most.
    let limit = max_frame.saturating_mul(16);
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return sse::PostError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "payload_too_large",
                message: format!("a POST may have at most {limit} bytes"),
                index: None,
            }
            .into_response()
        }
    };
    match upstream.post(seq, &bytes, max_frame) {
        Ok(n) => (StatusCode::ACCEPTED, Json(json!({ "accepted": n }))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn upgrade(
    app: Arc<AppState>,
    peer: PeerInfo,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // The client, as trusted proxies report it (never a header from anyone
    // else): what per-IP limits, logs and workers see.
    let remote = forwarded::client_addr(
        peer.addr,
        &headers,
        &app.settings.trusted_proxies,
        app.settings.trusted_proxy_header,
    );
    let path = uri.path();
    let table = app.route_table();
    let Some(found) = table.find(path) else {
        let hint = table.did_you_mean(path);
        warn!(%remote, path, did_you_mean = ?hint, "refused: unknown route");
        app.metrics.refused("unknown_route");
        let message = match &hint {
            Some(h) => format!("no route serves {path}; did you mean {h}?"),
            None => format!("no route serves {path}"),
        };
        return refuse(
            StatusCode::NOT_FOUND,
            "unknown_route",
            &message,
            json!({ "path": path, "did_you_mean": hint }),
        );
    };
    if app.draining.is_cancelled() {
        warn!(%remote, path, "refused: draining");
        app.metrics.refused("draining");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the router is shutting down",
            json!({ "path": path }),
        );
    }
    // An event stream (the HTTP fallback) or a WebSocket.
    let events = sse::wants_events(&headers);
    if events && (found.route.raw || !found.route.resume.enabled()) {
        let why = if found.route.raw {
            "a raw route has no event-stream form"
        } else {
            "the event-stream fallback needs session resume on the route (its POSTs use the resume token)"
        };
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("{path}: {why}"),
            json!({ "path": path }),
        );
    }
    let mut ws = match ws {
        _ if events => None,
        Ok(ws) => Some(ws),
        Err(rejection) => {
            let why = rejection.body_text();
            warn!(%remote, path, reason = %why, "refused: not a WebSocket upgrade");
            app.metrics.refused("websocket_required");
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                &format!("{path} is a WebSocket route: {why}"),
                json!({ "path": path }),
            );
        }
    };
    let route = found.route;
    // Admission order (ARCHITECTURE.md): cheap checks first; the router-wide
    // cap before the per-IP rate, so a full router does not spend clients'
    // allowance; the per-IP connection rate before anything that costs the
    // router work for an unknown client (token verification is the
    // expensive one); the route's own cap last.
    let Some(permit) = app.capacity.try_admit() else {
        app.metrics.refused("at_capacity");
        if let Some(skipped) = app.at_capacity_log.hit() {
            warn!(%remote, path, max_connections = app.capacity.max(), since_last_line = skipped, refused_total = app.capacity.refused(), "refused: at capacity (logged at most once a second)");
        }
        return at_capacity(&app);
    };
    let runtime = app.runtimes.get(&route.path);
    if app.settings.enable_rate_limit {
        if let Err(wait) = runtime
            .limits(&route.rate_limit)
            .connections
            .check(remote.ip)
        {
            let retry_after_ms = retry_after_ms(wait);
            warn!(%remote, path, retry_after_ms, "refused: connection rate limit");
            app.metrics.refused("rate_limited");
            app.metrics.rate_limited(&route.path, "connections");
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!(
                    "too many new connections from {} to {}",
                    remote.ip, route.path
                ),
                json!({ "path": path, "retry_after_ms": retry_after_ms }),
            );
        }
    }
    let origin = headers
        .get(axum::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if let Err(why) = auth::check_origin(route.allowed_origins.as_deref(), origin) {
        warn!(%remote, path, origin, reason = %why, "refused: origin");
        app.metrics.refused("origin_not_allowed");
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            &format!("{why} of {}", route.path),
            json!({ "path": path, "origin": origin, "allowed_origins": route.allowed_origins }),
        );
    }
    let client_cert = peer.client_cert.get().cloned();
    if route.client_cert_required && client_cert.is_none() {
        let why = match &app.tls {
            Some(tls) if tls.verifies_clients() => "needs a client certificate (mutual TLS)",
            Some(_) => {
                "needs a client certificate, and the router has no TLS_CLIENT_CA to verify one"
            }
            None => "needs a client certificate over TLS, and the router does not serve TLS",
        };
        warn!(%remote, path, "refused: no client certificate");
        app.metrics.refused("client_cert_required");
        return refuse(
            StatusCode::FORBIDDEN,
            "client_cert_required",
            &format!("{} {why}", route.path),
            json!({ "path": path }),
        );
    }
    let query = parse_query(uri.query());
    let mut claims = None;
    if let Some(policy) = &route.auth {
        match auth::find_token(&headers, &query) {
            None if policy.required => {
                warn!(%remote, path, "refused: missing token");
                app.metrics.refused("unauthorized");
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    &format!("{} needs a token: send `Authorization: Bearer <jwt>`, a `token` query parameter, or the subprotocols `bearer, <jwt>`", route.path),
                    json!({ "path": path }),
                );
            }
            None => {}
            Some((token, source)) => match auth::verify(policy, &token) {
                Ok(c) => {
                    claims = Some(c);
                    if source == auth::TokenSource::Subprotocol {
                        // Browsers fail the connection unless one of their
                        // subprotocols is selected.
                        ws = ws.map(|ws| ws.protocols(["bearer"]));
                    }
                }
                Err(why) => {
                    warn!(%remote, path, reason = %why, "refused: invalid token");
                    app.metrics.refused("unauthorized");
                    return refuse(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        &why,
                        json!({ "path": path }),
                    );
                }
            },
        }
    }
    let Some(slot) = runtime.try_connect(route.max_connections) else {
        warn!(%remote, path, limit = route.max_connections, "refused: route at its connection limit");
        app.metrics.refused("route_full");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "route_full",
            &format!(
                "{} is at its limit of {} connections",
                route.path, route.max_connections
            ),
            json!({ "path": path, "max_connections": route.max_connections }),
        );
    };
    let conn = ConnId::new();
    let connect = proto::Connect {
        conn: conn.0.to_string(),
        route: route.path.clone(),
        service: route.service.clone(),
        path: path.to_owned(),
        params: found.params,
        query,
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        remote: remote.to_string(),
        claims,
        client_cert: client_cert.map(|c| proto::ClientCert { subject: c.subject }),
    };
    let limit = route.max_message_bytes;
    let sessions = app.sessions.clone();
    let start = SessionStart {
        conn,
        route,
        connect,
        runtime,
        slot,
        permit,
    };
    // The handshake is done; the session's pings take over liveness.
    peer.deadline.disarm();
    start.permit.started();
    let Some(ws) = ws else {
        // The event stream: a session over an SSE socket, started now.
        let resume = sse::resume_request(&start.connect.query, &headers);
        let (socket, body) = sse::connect(app.sse.clone(), &start.conn.0, resume);
        info!(%remote, path, "event stream opened (HTTP fallback)");
        sessions.spawn(session::run(socket, app, start));
        return sse::response(body);
    };
    ws.max_message_size(limit)
        .max_frame_size(limit)
        // tungstenite allocates its read buffer eagerly (128 KiB by default):
        // a small one keeps idle connections cheap; it grows for big messages.
        .read_buffer_size(READ_BUFFER)
        // Frames are fed in batches and flushed once (the buffer grows only
        // as far as a batch needs).
        .write_buffer_size(WRITE_BUFFER)
        // max_write_buffer_size stays unlimited: it also caps the size of
        // one outbound message, and the buffer only grows past
        // write_buffer_size while writes fail (then the session gives up).
        .on_failed_upgrade(move |e| info!(%remote, error = %e, "upgrade failed"))
        // The session is a task of its own: axum's upgrade task (with its
        // copy of the configuration, the callback and the upgrade future)
        // ends here instead of living as long as the session.
        .on_upgrade(move |socket| {
            sessions.spawn(session::run(socket, app, start));
            std::future::ready(())
        })
}

/// Initial WebSocket read buffer per connection.
const READ_BUFFER: usize = 2 * 1024;
/// Bytes of fed frames tungstenite holds before writing them out.
const WRITE_BUFFER: usize = 64 * 1024;

/// Query parameters, last value wins; undecodable pairs are kept verbatim.
fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode_query_part(k), decode_query_part(v));
    }
    out
}

/// Lenient form decoding: `+` is a space, malformed escapes stay as they are.
fn decode_query_part(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(Some(
            "token=a%20b&x=1&x=2&flag&sp=a+b&bad=%zz&tail=%4&u=%C3%A9%",
        ));
        assert_eq!(q["token"], "a b");
        assert_eq!(q["x"], "2");
        assert_eq!(q["flag"], "");
        assert_eq!(q["sp"], "a b");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["tail"], "%4");
        assert_eq!(q["u"], "é%");
        assert!(parse_query(None).is_empty());
    }
}
