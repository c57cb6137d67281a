//! A real HTTP server on 127.0.0.1 for the steps' tests, and contexts for calls.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use sagaflow::{Phase, SagaId, StepContext};

/// Serves `app` on an ephemeral port; returns its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A step context as the engine would pass it, for saga `n`.
pub fn ctx(n: u8, step: &str) -> StepContext {
    let saga = SagaId::from_bytes([n; 16]);
    StepContext::for_test(saga, step, Phase::Action, serde_json::Value::Null)
}

pub const SHORT: Duration = Duration::from_millis(300);
