//! The axum REST API (DESIGN "REST API") and the MQTT-over-WebSocket endpoint `/mqtt`.

mod auth;
mod conversations;
pub mod error;

use axum::extract::FromRef;
use axum::routing::{get, put};
use axum::Router;

use crate::auth::Authenticator;
use crate::broker::{self, Gateway};
use crate::store::Store;

/// Largest REST request body.
pub const MAX_BODY: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub auth: Authenticator,
    pub gateway: Gateway,
}

impl FromRef<AppState> for Gateway {
    fn from_ref(state: &AppState) -> Gateway {
        state.gateway.clone()
    }
}

/// Routes a path both with and without its trailing slash, as the Django seed did.
fn both<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    path: &str,
    method: axum::routing::MethodRouter<S>,
) -> Router<S> {
    let bare = path.trim_end_matches('/');
    router
        .route(&format!("{bare}/"), method.clone())
        .route(bare, method)
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let r = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/mqtt", get(broker::ws::upgrade));
    let r = both(
        r,
        "/api/conversations/{cid}/",
        put(conversations::put).get(conversations::get),
    );
    r.fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}
