//! The demo page at `/`, with MQTT.js served by callbus itself (embedded at build time from the
//! npm package, never from a CDN).

use axum::http::header;
use axum::response::{Html, IntoResponse};

const INDEX: &str = include_str!("demo/index.html");
const SCRIPT: &str = include_str!("demo/demo.js");
const STYLE: &str = include_str!("demo/demo.css");
const MQTT_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/mqtt.min.js"));

pub async fn index() -> impl IntoResponse {
    Html(INDEX)
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

pub async fn mqtt_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        MQTT_JS,
    )
}
