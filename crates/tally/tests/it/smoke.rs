//! The server starts, answers health checks and refuses requests without a key.

use reqwest::StatusCode;

use crate::support::TestApp;

#[tokio::test]
async fn starts_and_requires_a_key() {
    let app = TestApp::spawn().await;
    let health = app.send(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "ok");
    let anonymous = app
        .send(reqwest::Method::GET, "/v1/customers/x", None, None)
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.code(), "unauthorized");
}
