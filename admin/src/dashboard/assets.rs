//! The stylesheet, embedded in the binary: the dashboard needs no files at run time
//! and no build step.

use axum::http::header;
use axum::response::IntoResponse;

const STYLE: &str = include_str!("assets/style.css");

pub(super) async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            // Not secret, and the same for every user: browsers may keep it a while.
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLE,
    )
}
