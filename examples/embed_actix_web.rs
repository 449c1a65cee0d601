//! procbroker inside an actix-web app: an HTTP handler calls a service
//! through the Router.
//!
//! ```text
//! cargo run --example embed_actix_web            # listens on 127.0.0.1:8080 (PORT to change)
//! curl 'http://127.0.0.1:8080/add?a=2&b=3'       # {"sum":5,"served_by":"calc.0"}
//! curl 'http://127.0.0.1:8080/stats'             # the GetMessageStats reply as JSON
//! ```
//!
//! The actors start on the System's arbiter before the server; the handle is
//! `Clone + Send`, so each HTTP worker thread gets a copy through `web::Data`.
//! The `calc` service here is in-process; a subprocess service is called the
//! same way.

use actix_web::{App, HttpResponse, HttpServer, web};
use procbroker::embed::{BrokerHandle, CallError, ProcBroker};
use procbroker::service::{HandlerError, Methods};
use serde::{Deserialize, Serialize};
use std::net::TcpListener;

#[derive(Deserialize)]
struct AddQuery {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize)]
pub struct AddResult {
    pub sum: i64,
    pub served_by: String,
}

/// The service: `Add` of two integers, refusing overflow.
fn calc() -> Methods {
    Methods::new().method("Add", |(a, b): (i64, i64)| async move {
        a.checked_add(b)
            .ok_or_else(|| HandlerError::new(format!("{a} + {b} overflows")))
    })
}

async fn add(broker: web::Data<BrokerHandle>, query: web::Query<AddQuery>) -> HttpResponse {
    match broker.call("calc", "Add", &(query.a, query.b)).await {
        Ok(reply) => match reply.payload_as::<i64>() {
            Ok(sum) => HttpResponse::Ok().json(AddResult {
                sum,
                served_by: reply.source().to_owned(),
            }),
            Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
        },
        // The callee's errors are the client's problem; the broker's are ours.
        Err(e @ CallError::Remote { .. }) if e.code() == Some("handler") => {
            HttpResponse::UnprocessableEntity().body(e.to_string())
        }
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

async fn stats(broker: web::Data<BrokerHandle>) -> HttpResponse {
    match broker.stats().await {
        Ok(stats) => HttpResponse::Ok().json(stats),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

/// Starts the broker and serves HTTP on `listener` until the System stops.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let broker = ProcBroker::builder().start();
    broker
        .add_service("calc", 2, calc())
        .await
        .map_err(std::io::Error::other)?;
    HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(broker.clone()))
            .route("/add", web::get().to(add))
            .route("/stats", web::get().to(stats))
    })
    .workers(2)
    .listen(listener)?
    .run()
    .await
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))?;
    println!("listening on http://{}", listener.local_addr()?);
    serve(listener).await
}
