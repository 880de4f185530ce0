//! `GET /console`: a page for people to try the routes (README, "Console"),
//! served from files built into the binary (`router/assets/console/`; the
//! client bundle there is made from `clients/js` by `npm run bundle`, and a
//! test there keeps it in step). No CDN, nothing fetched from elsewhere.

use axum::{
    http::{header, HeaderValue},
    response::IntoResponse,
    routing::get,
    Router,
};

const INDEX: &str = include_str!("../assets/console/index.html");
const CONSOLE_JS: &str = include_str!("../assets/console/console.js");
const CONSOLE_CSS: &str = include_str!("../assets/console/console.css");
const CLIENT_JS: &str = include_str!("../assets/console/client.js");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}

/// The console's routes, or none when it is off (`ENABLE_CONSOLE`).
pub fn routes<S: Clone + Send + Sync + 'static>(enabled: bool) -> Router<S> {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route(
            "/console/client.js",
            get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }),
        )
}
