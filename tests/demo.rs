//! `keycard demo` end to end: the real binary starts a CA and six sidecars as processes, drives
//! the Bookinfo flows over real sockets and reports what each deciding sidecar recorded.

use std::process::Command;

use serde_json::Value;

fn demo(extra: &[&str]) -> (bool, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_keycard"))
        .args(["demo", "-o", "json"])
        .args(extra)
        .output()
        .expect("run keycard demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("demo output is not JSON ({e}):\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.success(), report)
}

fn flow<'a>(report: &'a Value, flow: &str, request: &str) -> &'a Value {
    report["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["flow"] == flow && f["request"] == request)
        .unwrap_or_else(|| panic!("no flow {flow} {request} in {report:#}"))
}

#[test]
fn the_lab_policies_allow_bookinfo_and_stop_everyone_else() {
    let (success, r) = demo(&[]);
    assert!(success, "demo exited non-zero: {r:#}");
    assert_eq!(r["ok"], true);
    let flows = r["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 11);
    assert!(flows.iter().all(|f| f["ok"] == true), "{r:#}");

    let page = flow(&r, "outside → ingress → productpage", "GET /productpage");
    assert_eq!(page["got"], serde_json::json!({"kind": "status", "detail": 200}));
    assert_eq!(page["page"], "details 200, reviews 200 (ratings 200)");
    assert_eq!(page["mtls"], true);
    assert_eq!(page["caller"], "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account");
    assert_eq!(page["decided_by"], "ns[default]-policy[productpage-viewer]-rule[0]");

    let ratings = flow(&r, "reviews → ratings", "GET /ratings/0");
    assert_eq!(ratings["caller"], "cluster.local/ns/default/sa/bookinfo-reviews");
    assert_eq!(ratings["decided_by"], "ns[default]-policy[ratings-viewer]-rule[0]");

    for (who, req) in [
        ("productpage → details", "DELETE /details/0"),
        ("productpage → ratings", "GET /ratings/0"),
        ("sleep (valid identity) → details", "GET /details/0"),
    ] {
        let f = flow(&r, who, req);
        assert_eq!(f["got"]["detail"], 403, "{f:#}");
        assert_eq!(f["mtls"], true);
        assert_eq!(f["decided_by"], "no ALLOW rule matches (deny-all)");
    }
    assert_eq!(
        flow(&r, "sleep (valid identity) → details", "GET /details/0")["caller"],
        "cluster.local/ns/default/sa/sleep"
    );

    let plain = flow(&r, "intruder (plaintext) → details", "GET /details/0");
    assert_eq!(plain["got"]["kind"], "refused");
    assert_eq!(plain["decided_by"], "refused: plaintext_in_strict");
    let forged = flow(&r, "intruder (forged productpage cert) → details", "GET /details/0");
    assert_eq!(forged["got"]["kind"], "refused");
    assert_eq!(forged["decided_by"], "refused: unknown_ca");
    // The temporary work directory goes with a run that behaved.
    assert!(!std::path::Path::new(r["dir"].as_str().unwrap()).exists());
}

/// Without deny-all and with PERMISSIVE, the same flows go through that should not: the demo says
/// so and exits non-zero.
#[test]
fn weaker_policies_show_as_misbehaving_flows() {
    let dir = tempfile::tempdir().unwrap();
    let weak = dir.path().join("weak.yaml");
    let lab = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/bookinfo/policies.yaml"))
        .unwrap();
    let weak_text: String = lab
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: deny-all") && !doc.contains("name: details-viewer"))
        .map(|doc| doc.replace("mode: STRICT", "mode: PERMISSIVE"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    std::fs::write(&weak, weak_text).unwrap();
    let work = dir.path().join("work");
    let (success, r) = demo(&["--policies", weak.to_str().unwrap(), "--dir", work.to_str().unwrap()]);
    assert!(!success, "weak policies must fail the demo: {r:#}");
    assert_eq!(r["ok"], false);
    // details has no policy left: the identity without permission gets through, and so does a
    // plaintext caller.
    let sleep = flow(&r, "sleep (valid identity) → details", "GET /details/0");
    assert_eq!(sleep["got"]["detail"], 200);
    assert_eq!(sleep["ok"], false);
    assert_eq!(sleep["decided_by"], "no policy applies");
    let plain = flow(&r, "intruder (plaintext) → details", "GET /details/0");
    assert_eq!(plain["got"]["detail"], 200, "{plain:#}");
    assert_eq!(plain["ok"], false);
    // Judged by the access line the sidecar wrote for it: plaintext, no caller, no policy.
    assert_eq!(plain["mtls"], false);
    assert_eq!(plain["caller"], serde_json::Value::Null);
    assert_eq!(plain["decided_by"], "no policy applies");
    // ratings still has its viewer policy: productpage stays out, reviews gets in.
    assert_eq!(flow(&r, "productpage → ratings", "GET /ratings/0")["ok"], true);
    assert_eq!(flow(&r, "reviews → ratings", "GET /ratings/0")["ok"], true);
    // --dir is kept, with what a person needs to look into it.
    assert!(work.join("details/sidecar.log").exists());
    assert!(work.join("policies.yaml").exists());
}
