//! `examples/embed_actix_web.rs`, served on a free loopback port and asked
//! over real HTTP.

#[path = "../examples/embed_actix_web.rs"]
#[allow(dead_code)]
mod example;

mod support;

use support::get;

#[actix_web::test]
async fn the_example_serves_http_through_the_router() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    actix_web::rt::spawn(example::serve(listener));

    let (status, body) = get(addr, "/add?a=2&b=3").await;
    assert_eq!(status, 200, "{body}");
    let result: example::AddResult = serde_json::from_str(&body).expect("json");
    assert_eq!(result.sum, 5);
    assert!(
        result.served_by.starts_with("calc."),
        "{}",
        result.served_by
    );

    // The handler's own error surfaces as 422, with its message.
    let (status, body) = get(addr, &format!("/add?a={}&b=1", i64::MAX)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("overflows"), "{body}");

    let (status, body) = get(addr, "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["latency_us"]["calc"]["count"], 2);
    assert_eq!(stats["total"]["request_count"], 2);
}
