//! Istio's request metrics over real sockets, counted exactly when one port's requests end with
//! more label sets (here: status codes) than a port keeps resolved counters for (32).

mod common;

use common::l7::*;
use common::mesh::*;
use keycard_config::sidecar::Protocol;

const STRICT_MESH: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_is_counted_on_both_sides() {
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, STRICT_MESH, Protocol::Http, Protocol::Http).await;
    let (c, out) = (h1_client(), mesh.outbound());
    let codes: Vec<u16> =
        (200..220).chain(400..410).chain([301, 302, 418, 451, 500, 502, 503, 504]).collect();
    for round in 0..3 {
        for &code in &codes {
            let a = call(&c, out, "GET", &format!("/status/{code}"), &[]).await;
            assert_eq!(a.status, code, "round {round}: {}", a.body);
        }
    }
    let (client, server) = (mesh.client.metrics(), mesh.server.metrics());
    for &code in &codes {
        let code = format!("response_code=\"{code}\"");
        for (m, reporter) in [(&client, "reporter=\"source\""), (&server, "reporter=\"destination\"")] {
            let having = [reporter, code.as_str(), "connection_security_policy=\"mutual_tls\""];
            assert_eq!(metric_sum(m, "istio_requests_total", &having), 3.0, "{code} {reporter}\n{m}");
            let count = metric_sum(m, "istio_request_duration_milliseconds_count", &having);
            assert_eq!(count, 3.0, "{code} {reporter}\n{m}");
            assert_eq!(metric_sum(m, "istio_response_bytes_count", &having), 3.0, "{code} {reporter}\n{m}");
        }
    }
    let total = 3.0 * codes.len() as f64;
    assert_eq!(metric_sum(&server, "istio_requests_total", &[]), total, "{server}");
    mesh.shutdown().await;
}
