//! `keycard inject -f deploy.yaml`: Kubernetes manifests in, the same manifests with keycard added
//! to every pod template out (like `istioctl kube-inject`). `pod` edits one pod template,
//! `sidecar` writes the sidecar's configuration, `services` turns the input's Services into its
//! upstreams; this file reads and writes the documents.
//!
//! Each injected workload gets, in the output, a `ConfigMap` `keycard-sidecar-<name>` holding
//! its sidecar configuration, placed just before it. The configuration is generated here, from
//! the pod template, because the sidecar reads a static file: its namespace, service account,
//! labels and ports are known now, and a ConfigMap is how Kubernetes delivers a file. Injection
//! is idempotent: what a previous run added (containers, volumes, the generated ConfigMap) is
//! replaced, never duplicated. Other documents pass through unchanged, in order.
//!
//! Documents are edited as `serde_json::Value` (with serde_json's `preserve_order`, so the
//! user's key order survives); comments and YAML styling do not survive the round trip.

mod pod;
mod services;
mod sidecar;

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use keycard_config::TrustDomain;
use serde_json::{Map, Value};
use serde_saphyr::Spanned;

use pod::CONFIG_MAP_PREFIX;

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Kubernetes YAML to inject (one or more documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: PathBuf,
    /// Write the result here instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    options: Options,
}

/// What the injected pods look like.
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// Image of the sidecar (`keycard proxy`).
    #[arg(long, default_value = "keycard:dev")]
    pub image: String,
    /// Image of the capture init step (`keycard iptables` as its entrypoint).
    #[arg(long, default_value = "keycard-init:dev")]
    pub init_image: String,
    /// Namespace of workloads whose metadata names none (it is part of their identity).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Trust domain of the workloads' SPIFFE IDs.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// The CA the sidecars get certificates from.
    #[arg(long, default_value = "https://keycard-ca.keycard-system.svc:15012")]
    pub ca_url: String,
    /// Audience of the projected service-account token the sidecar shows the CA (`keycard ca
    /// serve --k8s-audience`).
    #[arg(long, default_value = keycard_ca::k8s::DEFAULT_AUDIENCE)]
    pub token_audience: String,
    /// Certificate lifetime the sidecars ask for (the CA may shorten it).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: std::time::Duration,
    /// For clusters without native sidecars (before Kubernetes 1.29): the proxy runs as the first
    /// of `containers` instead of an init container with `restartPolicy: Always`.
    #[arg(long)]
    pub legacy: bool,
}

/// A manifest that cannot be injected: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct InjectError {
    pub file: String,
    /// 1-based; 0 when unknown.
    pub line: u64,
    pub message: String,
}

/// The injected manifests, and a line for each workload left alone or likely to surprise (for
/// stderr).
#[derive(Debug)]
pub struct Injected {
    pub yaml: String,
    pub notes: Vec<String>,
}

pub fn run(a: InjectArgs) -> anyhow::Result<ExitCode> {
    let (text, name) = if a.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
        (text, "<stdin>".to_owned())
    } else {
        let text =
            std::fs::read_to_string(&a.file).with_context(|| format!("{}: cannot read", a.file.display()))?;
        (text, a.file.display().to_string())
    };
    let injected = inject(&text, &name, &a.options)?;
    for note in &injected.notes {
        eprintln!("keycard inject: {note}");
    }
    match &a.output {
        Some(path) => std::fs::write(path, &injected.yaml)
            .with_context(|| format!("{}: cannot write", path.display()))?,
        None => std::io::stdout().write_all(injected.yaml.as_bytes()).context("cannot write stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Injects every pod template of `text` (YAML, one or more documents); `file` names it in errors.
pub fn inject(text: &str, file: &str, opts: &Options) -> Result<Injected, InjectError> {
    let docs: Vec<Spanned<Value>> = serde_saphyr::from_multiple(text).map_err(|e| yaml_error(&e, file))?;
    // ConfigMaps a previous run generated give way to the ones made now (idempotence); those of
    // workloads not injected this time stay.
    let mut regenerated = Vec::new();
    let (mut services, mut selectable) = (Vec::new(), Vec::new());
    for doc in &docs {
        for_each_object(&doc.value, &mut |obj| {
            if obj.get("kind").and_then(Value::as_str) == Some("Service") {
                let ns = obj.get("metadata").and_then(|m| m.get("namespace")?.as_str());
                services.push((obj, ns.unwrap_or(&opts.namespace).to_owned()));
            }
            if let Ok(Some(w)) = locate(obj, opts)
                && let Some(template) = template_of(obj, w.template_path)
                && pod::skip_reason(template).is_none()
            {
                let (labels, service_account) = pod::identity_facts(template);
                selectable.push(services::Selectable {
                    namespace: w.namespace.clone(),
                    labels,
                    service_account,
                });
                regenerated.push(w.config_map_key());
            }
        });
    }
    let upstreams = services::upstreams(&services, &selectable, opts);
    let mut cx = Cx { file, text, opts, upstreams, regenerated, notes: Vec::new(), generated: Vec::new() };
    let mut out: Vec<Value> = Vec::new();
    for doc in docs {
        cx.document(doc.value, doc.referenced.line(), &mut out)?;
    }
    let mut yaml = String::new();
    for (i, v) in out.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        let doc = serde_saphyr::to_string_with_options(v, yaml_options()).map_err(|e| InjectError {
            file: file.to_owned(),
            line: 0,
            message: e.to_string(),
        })?;
        yaml.push_str(&doc);
    }
    Ok(Injected { yaml, notes: cx.notes })
}

/// Long single-line strings stay plain (no folding); multi-line ones (the sidecar
/// configuration) are literal blocks.
fn yaml_options() -> serde_saphyr::SerializerOptions {
    let mut opts = serde_saphyr::SerializerOptions::default();
    opts.folded_wrap_chars = usize::MAX / 2;
    opts
}

/// A workload found in a document: where its pod template is and whose it is.
struct Located {
    kind: String,
    name: String,
    namespace: String,
    template_path: &'static [&'static str],
}

impl Located {
    fn config_map_key(&self) -> (String, String) {
        (self.namespace.clone(), format!("{CONFIG_MAP_PREFIX}{}", self.name))
    }
}

/// The workload `obj` is, `None` for kinds without a pod template.
fn locate(obj: &Map<String, Value>, opts: &Options) -> Result<Option<Located>, String> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let template_path: &'static [&'static str] = match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            &["spec", "template"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(None),
    };
    let metadata = obj.get("metadata").and_then(Value::as_object);
    let field = |key: &str| metadata.and_then(|m| m.get(key)?.as_str());
    let name = field("name")
        .or_else(|| field("generateName").map(|g| g.trim_end_matches('-')))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{kind} without metadata.name"))?;
    let namespace = field("namespace").unwrap_or(&opts.namespace);
    Ok(Some(Located {
        kind: kind.to_owned(),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        template_path,
    }))
}

fn template_of<'v>(obj: &'v Map<String, Value>, path: &[&str]) -> Option<&'v Map<String, Value>> {
    path.iter().try_fold(obj, |at, key| at.get(*key)?.as_object())
}

fn template_of_mut<'v>(obj: &'v mut Map<String, Value>, path: &[&str]) -> Option<&'v mut Map<String, Value>> {
    path.iter().try_fold(obj, |at, key| at.get_mut(*key)?.as_object_mut())
}

/// `f` on each object of a document: the document, or the items of a `List`.
fn for_each_object<'v>(doc: &'v Value, f: &mut impl FnMut(&'v Map<String, Value>)) {
    let Some(obj) = doc.as_object() else { return };
    match obj.get("items").and_then(Value::as_array) {
        Some(items) if obj.get("kind").and_then(Value::as_str) == Some("List") => {
            items.iter().for_each(|item| for_each_object(item, f));
        }
        _ => f(obj),
    }
}

/// One input's state while its documents are injected.
struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    opts: &'a Options,
    /// Every injected sidecar's upstreams: the input's Services that have a cluster IP.
    upstreams: Vec<keycard_config::sidecar::Upstream>,
    /// `(namespace, name)` of the ConfigMaps this run makes.
    regenerated: Vec<(String, String)>,
    notes: Vec<String>,
    /// `(namespace, name)` of the ConfigMaps made so far.
    generated: Vec<(String, String)>,
}

impl Cx<'_> {
    /// Injects one document (starting at `line`) and pushes it to `out`, after the ConfigMap it
    /// needs; a ConfigMap a previous run made for a workload injected now is dropped.
    fn document(&mut self, mut doc: Value, line: u64, out: &mut Vec<Value>) -> Result<(), InjectError> {
        let Some(obj) = doc.as_object_mut() else {
            return Err(self.err(line, "a document is not a mapping (a Kubernetes object)"));
        };
        if pod::generated_config_map_key(obj).is_some_and(|key| self.regenerated.contains(&key)) {
            return Ok(());
        }
        if obj.get("kind").and_then(Value::as_str) == Some("List")
            && let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut)
        {
            let mut injected = Vec::with_capacity(items.len());
            for item in std::mem::take(items) {
                self.document(item, line, &mut injected)?;
            }
            *items = injected;
            out.push(doc);
            return Ok(());
        }
        let Some(w) = locate(obj, self.opts).map_err(|msg| self.err(line, msg))? else {
            out.push(doc);
            return Ok(());
        };
        let what = format!("{}/{}", w.kind, w.name);
        let Some(template) = template_of_mut(obj, w.template_path) else {
            let msg = format!("{what}: no pod template (`{}` is not a mapping)", w.template_path.join("."));
            return Err(self.err(line, msg));
        };
        if let Some(why) = pod::skip_reason(template) {
            self.notes.push(format!("{what} left alone: {why}"));
            out.push(doc);
            return Ok(());
        }
        let workload = pod::Workload { kind: &w.kind, name: &w.name, namespace: &w.namespace };
        let injected = pod::inject(template, &workload, &self.upstreams, self.opts).map_err(|e| {
            let at = self.line_of(line, e.near.as_deref());
            self.err(at, format!("{what}: {}", e.message))
        })?;
        self.notes.extend(injected.warnings.into_iter().map(|w| format!("{what}: {w}")));
        let key = w.config_map_key();
        if self.generated.contains(&key) {
            let msg = format!(
                "{what}: another workload in namespace {} has this name; both would use ConfigMap {}",
                key.0, key.1
            );
            return Err(self.err(line, msg));
        }
        self.generated.push(key);
        out.push(injected.config_map);
        out.push(doc);
        Ok(())
    }

    fn err(&self, line: u64, message: impl Into<String>) -> InjectError {
        InjectError { file: self.file.to_owned(), line, message: message.into() }
    }

    /// The first line at or after `from` that mentions `needle` (an annotation's key), else `from`.
    fn line_of(&self, from: u64, needle: Option<&str>) -> u64 {
        let Some(needle) = needle else { return from };
        let skip = usize::try_from(from.saturating_sub(1)).unwrap_or(0);
        self.text
            .lines()
            .enumerate()
            .skip(skip)
            .find(|(_, l)| l.contains(needle))
            .map_or(from, |(i, _)| i as u64 + 1)
    }
}

fn yaml_error(e: &serde_saphyr::Error, file: &str) -> InjectError {
    let message = keycard_config::policy::load::yaml_message(e);
    let line = e.location().map_or(0, |l| l.line());
    InjectError { file: file.to_owned(), line, message: format!("not valid YAML: {message}") }
}

/// The object at `key` of `map`, made (empty) when absent or not an object.
fn object_at<'m>(map: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let slot = map.entry(key.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("made an object just above")
}

/// The list at `key` of `map`, made (empty) when absent or not a list.
fn array_at<'m>(map: &'m mut Map<String, Value>, key: &str) -> &'m mut Vec<Value> {
    let slot = map.entry(key.to_owned()).or_insert_with(|| Value::Array(Vec::new()));
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    slot.as_array_mut().expect("made a list just above")
}

#[cfg(test)]
mod tests;
