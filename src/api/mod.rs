//! The axum REST API (DESIGN "REST API") and the MQTT-over-WebSocket endpoint `/mqtt`.

mod auth;
mod calls;
mod conversations;
mod demo;
pub mod error;
mod misc;
pub mod turn;

use axum::extract::FromRef;
use axum::http::{header, HeaderValue, Method};
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::Authenticator;
use crate::broker::{self, Gateway};
use crate::calls::Calls;
use crate::conversations::ConversationService;
use turn::TurnConfig;

/// Largest REST request body.
pub const MAX_BODY: usize = 64 * 1024;

/// What every handler can reach: shared, as axum clones the state for every request.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(std::sync::Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services behind the REST API.
pub struct Services {
    pub conversations: ConversationService,
    pub auth: Authenticator,
    pub gateway: Gateway,
    pub calls: Calls,
    pub turn: Option<TurnConfig>,
    /// `--dev`: development tokens on.
    pub dev: bool,
    /// Cluster mode: this node's view of the others.
    pub cluster: Option<std::sync::Arc<crate::cluster::Cluster>>,
    /// The embedded store's free-space reserve, which decides whether a change may start (none
    /// in cluster mode: changes go to PostgreSQL).
    pub storage: Option<crate::store::SpaceGate>,
    /// Calls started per user (`[calls] initiate_per_minute`; per node in cluster mode).
    pub initiations: crate::rate::KeyedRate<String>,
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

/// The whole HTTP surface; browsers from `cors_origins` may call the REST API.
pub fn router(state: AppState, cors_origins: &[HeaderValue]) -> Router {
    let r = Router::new()
        .route("/healthz", get(misc::healthz))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    crate::metrics::render(),
                )
            }),
        )
        .route("/", get(demo::index))
        .route("/demo.js", get(demo::script))
        .route("/demo.css", get(demo::style))
        .route("/static/mqtt.min.js", get(demo::mqtt_js))
        .route("/mqtt", get(broker::ws::upgrade));
    let routes: [(&str, axum::routing::MethodRouter<AppState>); 10] = [
        (
            "/api/conversations/{cid}/",
            put(conversations::put).get(conversations::get),
        ),
        ("/api/calls/initiate/", post(calls::initiate)),
        ("/api/calls/{id}/accept/", post(calls::accept)),
        ("/api/calls/{id}/reject/", post(calls::reject)),
        ("/api/calls/{id}/end/", post(calls::end)),
        ("/api/calls/{id}/", get(calls::get)),
        ("/api/calls/", get(calls::history)),
        ("/api/notifications/", post(misc::notify)),
        ("/api/turn/", get(misc::turn)),
        ("/api/dev/token/", post(misc::dev_token)),
    ];
    let r = routes
        .into_iter()
        .fold(r, |r, (path, method)| both(r, path, method));
    let cors = cors(cors_origins);
    r.fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(cors)
        .with_state(state)
}

/// Taken by every handler that changes something: refuses the change (503 `{"error": ...}`)
/// while the data dir is at its free-space reserve, before anything of it is applied. (An
/// extractor, not a middleware layer: a layer on every request cost a fifth of the
/// notification throughput.)
pub struct Room;

impl axum::extract::FromRequestParts<AppState> for Room {
    type Rejection = error::ApiError;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, error::ApiError> {
        if let Some(gate) = &state.storage {
            gate.admit()?;
        }
        Ok(Room)
    }
}

/// CORS for the configured origins only; other origins get no CORS headers, so browsers refuse.
fn cors(origins: &[HeaderValue]) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

/// Reads `body` as the REST endpoint `which` picks reads its body, then checks it as the
/// handler does (for the fuzz targets: see [`crate::fuzzing`]). Every outcome is an answer;
/// none may panic.
#[doc(hidden)]
pub fn fuzz_rest_body(which: u8, body: &[u8]) {
    use serde_json::{Map, Value};
    let checked: Result<(), error::ApiError> = match which % 5 {
        0 => error::optional_json::<Map<String, Value>>(body)
            .and_then(|b| calls::initiate_body(&b).map(drop)),
        1 => error::optional_json::<calls::AcceptBody>(body).and_then(|b| b.device().map(drop)),
        2 => error::optional_json::<calls::EndBody>(body).and_then(|b| b.hangup_reason().map(drop)),
        3 => serde_json::from_slice::<conversations::PutConversation>(body)
            .map_err(|e| error::ApiError::BadRequest(e.to_string()))
            .and_then(|b| b.members().map(drop)),
        _ => error::optional_json::<Map<String, Value>>(body)
            .and_then(|b| misc::notify_body(&b).map(drop)),
    };
    if let Err(e) = checked {
        let _ = axum::response::IntoResponse::into_response(e);
    }
}
