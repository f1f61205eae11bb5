//! The operator tools against a live sidecar: `status` (the PERMISSIVE census), `certs`, and
//! `policy suggest`'s round trip: observe in PERMISSIVE → suggest (from the admin API and from the
//! access log, which must agree) → `policy check` it → apply → the observed flows still pass and
//! everything else is refused, each answer matching `policy explain`'s.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::l7::{call, h1_client, inspect_app};
use common::mesh::*;
use common::{free_ports, keycard, path};
use keycard_config::sidecar::Protocol;
use serde_json::Value;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn kc(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || keycard().args(&args).output().unwrap()).await.unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// The suggestion without its first line (which names where it came from, and when).
fn body(yaml: &str) -> String {
    yaml.lines().skip(1).collect::<Vec<_>>().join("\n")
}

const DETAILS: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-details";
const PP: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_suggest_apply_lets_exactly_the_observed_flows_through() {
    let pki = Pki::new();
    let web = inspect_app().await;
    let tcp_app = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("mesh.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
    )
    .unwrap();
    let [http_port, tcp_port, admin, metrics, ready] = free_ports(5)[..] else { unreachable!() };
    let keycard_config::sidecar::IdentitySource::Files { cert, key, bundle } =
        pki.files("default", "bookinfo-details")
    else {
        unreachable!()
    };
    let cfg_path = dir.path().join("details.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "workload: {{trust_domain: cluster.local, namespace: default, service_account: bookinfo-details, labels: {{app: details, version: v1}}}}
identity: {{files: {{cert: {}, key: {}, bundle: {}}}}}
inbound:
  - {{port: 9080, listen: 127.0.0.1:{http_port}, app: {web}, protocol: http}}
  - {{port: 9090, listen: 127.0.0.1:{tcp_port}, app: {tcp_app}, protocol: tcp}}
policy: {{paths: [{}]}}
admin: 127.0.0.1:{admin}
metrics: 127.0.0.1:{metrics}
readiness: 127.0.0.1:{ready}
limits: {{watch_interval: 100ms}}
",
            path(&cert),
            path(&key),
            path(&bundle),
            path(&policies)
        ),
    )
    .unwrap();
    let log_path = dir.path().join("details.log");
    let _server = Proc(
        keycard()
            .args(["--log-format", "json", "proxy", "--config", path(&cfg_path)])
            .stderr(std::fs::File::create(&log_path).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = format!("127.0.0.1:{admin}");
    wait_ready(format!("127.0.0.1:{ready}").parse().unwrap()).await;
    let http_in: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let tcp_in: SocketAddr = format!("127.0.0.1:{tcp_port}").parse().unwrap();

    // Callers: productpage (HTTP and TCP), reviews (TCP), sleep (HTTP, only after the policy).
    let caller = |sa: &'static str, ups: Vec<(SocketAddr, Protocol)>| {
        let mut cfg = config(SidecarSpec {
            ns: "default",
            sa,
            labels: &[],
            identity: pki.files("default", sa),
            inbound: vec![],
            outbound: ups.iter().map(|(a, _)| (*a, vec![Pki::id("default", "bookinfo-details")])).collect(),
            policy: None,
        });
        for (u, (_, proto)) in cfg.outbound.iter_mut().zip(&ups) {
            u.protocol = Some(*proto);
        }
        cfg
    };
    let pp =
        start(caller("bookinfo-productpage", vec![(http_in, Protocol::Http), (tcp_in, Protocol::Tcp)])).await;
    let reviews = start(caller("bookinfo-reviews", vec![(tcp_in, Protocol::Tcp)])).await;
    let sleep = start(caller("sleep", vec![(http_in, Protocol::Http)])).await;
    let (pp_http, pp_tcp) = (pp.addrs.outbound[0], pp.addrs.outbound[1]);
    let client = h1_client();

    // Observe, in PERMISSIVE with no AuthorizationPolicy.
    for target in ["/details/0", "/details/1", "/health"] {
        assert_eq!(call(&client, pp_http, "GET", target, &[]).await.status, 200, "{target}");
    }
    assert_eq!(roundtrip(reviews.addrs.outbound[0]).await, Ok(()));
    assert_eq!(http_get(http_in, "/details/0").await.map(|(c, _)| c), Some(200), "plaintext, PERMISSIVE");

    // status: the census says who still sends plaintext.
    let out = kc(args(&["status", "--admin", &admin, "-o", "json"])).await;
    let s = json(&out);
    assert_eq!(s["spiffe_id"], DETAILS);
    let ports: Vec<(u64, &str)> = s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(ports, [(9080, "PERMISSIVE"), (9090, "PERMISSIVE")]);
    let sources: Vec<(bool, &str)> = s["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["mtls"].as_bool().unwrap(), x["source"].as_str().unwrap()))
        .collect();
    for want in [
        (true, "cluster.local/ns/default/sa/bookinfo-productpage"),
        (true, "cluster.local/ns/default/sa/bookinfo-reviews"),
        (false, "127.0.0.1"),
    ] {
        assert!(sources.contains(&want), "{want:?} not in {sources:?}");
    }
    assert_eq!(s["safe_to_go_strict"]["safe"], false);
    assert!(
        s["safe_to_go_strict"]["plaintext_sources"][0]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1 -> port 9080")
    );
    assert_eq!(s["policy"]["generation"], 1);
    assert!(s["certificate"]["expires_in_seconds"].as_i64().unwrap() > 3000);
    let text = String::from_utf8(kc(args(&["status", "--admin", &admin])).await.stdout).unwrap();
    assert!(text.contains("STRICT?   no: 1 source(s) sent plaintext"), "{text}");
    // A caller's status shows its upstreams' routes: no DestinationRule, mutual TLS to details.
    let pp_admin = pp.addrs.admin.to_string();
    let s = json(&kc(args(&["status", "--admin", &pp_admin, "-o", "json"])).await);
    let routes: Vec<(&str, &str, &str)> = s["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let expected = r["expected_identities"][0].as_str().unwrap();
            (r["remote"].as_str().unwrap(), r["tls_mode"].as_str().unwrap(), expected)
        })
        .collect();
    let (http_remote, tcp_remote) = (http_in.to_string(), tcp_in.to_string());
    assert_eq!(
        routes,
        [(http_remote.as_str(), "ISTIO_MUTUAL", DETAILS), (tcp_remote.as_str(), "ISTIO_MUTUAL", DETAILS)]
    );
    let text = String::from_utf8(kc(args(&["status", "--admin", &pp_admin])).await.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "          {http_in}: rule none, ISTIO_MUTUAL to {DETAILS}, h2 upgrade no, connect within 5000 ms"
        )),
        "{text}"
    );

    // certs: the chain the sidecar serves is the one on disk.
    let c = json(&kc(args(&["certs", "--admin", &admin, "-o", "json"])).await);
    assert_eq!((c["spiffe_id"].as_str(), c["chain"][0]["kind"].as_str()), (Some(DETAILS), Some("leaf")));
    assert_eq!(c["trust_bundle"][0]["kind"], "root");
    let pem = kc(args(&["certs", "--admin", &admin, "-o", "pem"])).await;
    let served = keycard_config::pem::certs_from_pem(&pem.stdout, "certs -o pem").unwrap();
    let on_disk = keycard_config::pem::certs_from_file(&cert).unwrap();
    assert_eq!(served[0], on_disk[0]);
    let roots = kc(args(&["certs", "--admin", &admin, "-o", "pem", "--bundle"])).await;
    assert_eq!(
        keycard_config::pem::certs_from_pem(&roots.stdout, "roots").unwrap(),
        keycard_config::pem::certs_from_file(&bundle).unwrap()
    );

    // suggest, from the admin API and from the access log: the same policy.
    let suggested = dir.path().join("suggested.yaml");
    let out = kc(args(&["policy", "suggest", "--admin", &admin, "--out", path(&suggested)])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_admin = std::fs::read_to_string(&suggested).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out =
            kc(args(&["policy", "suggest", "--access-log", path(&log_path), "--sidecar", path(&cfg_path)]))
                .await;
        let from_log = String::from_utf8(out.stdout).unwrap();
        if body(&from_log) == body(&from_admin) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the access log's suggestion:\n{from_log}\nthe admin API's:\n{from_admin}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        from_admin.contains("methods: [\"GET\"]\n        paths: [\"/details/*\", \"/health\"]"),
        "{from_admin}"
    );
    assert!(from_admin.contains("127.0.0.1 -> port 9080"), "plaintext sources are listed:\n{from_admin}");
    let out = kc(args(&["policy", "check", "-f", path(&suggested), "--sidecar", path(&cfg_path)])).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));

    // Apply it; the sidecar reloads.
    std::fs::copy(&suggested, policies.join("suggested.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while json(&kc(args(&["status", "--admin", &admin, "-o", "json"])).await)["policy"]["generation"] != 2 {
        assert!(Instant::now() < deadline, "the policy was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every observed flow still passes; nothing else does; `explain` agrees each time.
    let http_cases = [
        (pp_http, PP, "GET", "/details/7", 200),
        (pp_http, PP, "GET", "/health", 200),
        (pp_http, PP, "DELETE", "/details/0", 403),
        (pp_http, PP, "GET", "/ratings/0", 403),
        (sleep.addrs.outbound[0], SLEEP, "GET", "/details/0", 403),
    ];
    for (via, from, method, target, want) in http_cases {
        assert_eq!(call(&client, via, method, target, &[]).await.status, want, "{from} {method} {target}");
        let e = explain_live(
            &policies,
            &cfg_path,
            &["--from", from, "--port", "9080", "--method", method, "--path", target],
        )
        .await;
        assert_eq!(e["allowed"], want == 200, "explain disagrees on {from} {method} {target}: {e:#}");
    }
    let tcp_cases = [(reviews.addrs.outbound[0], REVIEWS, true), (pp_tcp, PP, false)];
    for (via, from, allowed) in tcp_cases {
        assert_eq!(roundtrip(via).await.is_ok(), allowed, "{from} tcp 9090");
        let e = explain_live(&policies, &cfg_path, &["--from", from, "--port", "9090"]).await;
        assert_eq!(e["allowed"], allowed, "explain disagrees on {from} tcp: {e:#}");
    }
    assert_eq!(http_get(http_in, "/details/0").await, None, "plaintext is refused once STRICT");
    let e = explain_live(&policies, &cfg_path, &["--plaintext", "--port", "9080"]).await;
    assert_eq!(e["reason"], "plaintext_in_strict");

    let s = json(&kc(args(&["status", "--admin", &admin, "-o", "json"])).await);
    assert_eq!(s["ports"][0]["mode"], "STRICT");
    assert_eq!(s["safe_to_go_strict"]["safe"], true, "{s:#}");
    for r in [pp, reviews, sleep] {
        r.shutdown().await;
    }
}

async fn explain_live(policies: &Path, cfg: &Path, extra: &[&str]) -> Value {
    let mut a = args(&[
        "policy",
        "explain",
        "-f",
        path(policies),
        "--sidecar",
        path(cfg),
        "--workload",
        "default/bookinfo-details",
        "-o",
        "json",
    ]);
    a.extend(args(extra));
    json(&kc(a).await)
}
