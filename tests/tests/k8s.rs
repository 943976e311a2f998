//! What can be checked of the Kubernetes manifests (`deploy/k8s`) without a cluster: the YAML
//! parses and Kustomize lists every file, each service runs the binary it should with probes
//! on the real health paths and port, every setting given is one txpipe reads and accepts,
//! every Secret reference resolves, each worker has a disruption budget and a KEDA
//! ScaledObject on the queue the code declares for its stage.

use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use txpipe_common::stage::{Service, Stage};
use txpipe_common::{Names, Settings};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s");

/// Every document of every manifest, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(DIR).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
            out.push((file.clone(), v));
        }
    }
    out
}

fn of_kind<'a>(all: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|(_, v)| v["kind"] == kind).map(|(_, v)| v).collect()
}

fn named<'a>(all: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    of_kind(all, kind).into_iter().find(|v| v["metadata"]["name"] == name)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The binary each service's container runs.
fn binary(service: Service) -> &'static str {
    match service {
        Service::Gateway => "ingest-gateway",
        Service::Worker(stage) => stage.as_str(),
    }
}

#[test]
fn kustomize_lists_every_manifest_and_each_parses() {
    let all = manifests();
    let k = all.iter().find(|(f, _)| f == "kustomization.yaml").expect("kustomization.yaml").1.clone();
    let listed: Vec<&str> = k["resources"].as_sequence().unwrap().iter().map(s).collect();
    let files: std::collections::BTreeSet<&str> =
        all.iter().map(|(f, _)| f.as_str()).filter(|f| *f != "kustomization.yaml").collect();
    assert_eq!(listed.iter().copied().collect::<std::collections::BTreeSet<_>>(), files);
    for (file, v) in &all {
        assert!(v["kind"].is_string(), "{file}: every document has a kind");
    }
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own large error
fn each_service_runs_its_binary_with_probes_on_its_port_and_settings_txpipe_accepts() {
    let all = manifests();
    let config = named(&all, "ConfigMap", "txpipe-config").expect("the txpipe-config ConfigMap");
    let dockerfile = std::fs::read_to_string(format!("{DIR}/../../compose/Dockerfile")).unwrap();
    for service in Service::ALL {
        let name = format!("txpipe-{}", service.name());
        let d = named(&all, "Deployment", &name).unwrap_or_else(|| panic!("a Deployment {name}"));
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(s(&c["command"][0]), binary(service), "{name} runs its binary");
        assert!(dockerfile.contains(&format!("target/release/{}", binary(service))), "the image ships it");
        assert!(c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string());
        // the environment as the process sees it: the ConfigMap, then the container's own
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in config["data"].as_mapping().unwrap() {
            env.insert(s(k).to_owned(), s(v).to_owned());
        }
        for e in c["env"].as_sequence().unwrap() {
            let value = match e.get("value") {
                Some(v) => s(v).to_owned(),
                None => {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    let secret = named(&all, "Secret", s(&r["name"])).expect("a referenced Secret exists");
                    s(&secret["stringData"][s(&r["key"])]).to_owned()
                }
            };
            env.insert(s(&e["name"]).to_owned(), value);
        }
        let port = c["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == "http").expect("an http port")
            ["containerPort"]
            .as_u64()
            .unwrap();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{name} {probe}");
            assert_eq!(c[probe]["httpGet"]["port"], "http", "{name} {probe} on the http port");
        }
        let mut settings = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in env.iter().filter(|(k, _)| k.starts_with("TXPIPE_")) {
                jail.set_env(k, v);
            }
            settings = Some(Settings::load().map_err(|e| format!("{name}: {e}"))?);
            Ok(())
        });
        let settings = settings.expect("loaded");
        assert_eq!(settings.http_addr.map(|a| u64::from(a.port())), Some(port), "{name} listens on its port");
        assert_eq!(settings.http_addr.map(|a| a.ip().is_unspecified()), Some(true), "{name} listens on the pod IP");
        let pdb = of_kind(&all, "PodDisruptionBudget")
            .into_iter()
            .find(|p| p["spec"]["selector"] == d["spec"]["selector"])
            .unwrap_or_else(|| panic!("a PodDisruptionBudget for {name}"));
        assert!(pdb["spec"].get("minAvailable").is_some() || pdb["spec"].get("maxUnavailable").is_some());
    }
    let job = of_kind(&all, "Job").into_iter().next().expect("the provision Job");
    let cmd: Vec<&str> =
        job["spec"]["template"]["spec"]["containers"][0]["command"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(cmd, ["txpipe", "provision"]);
}

#[test]
fn keda_scales_each_worker_on_the_queue_the_code_declares() {
    let all = manifests();
    let config = named(&all, "ConfigMap", "txpipe-config").unwrap();
    let names = Names::new(s(&config["data"]["TXPIPE_NAMESPACE"])).unwrap();
    for stage in Stage::ALL {
        let name = format!("txpipe-{stage}");
        let so = named(&all, "ScaledObject", &name).unwrap_or_else(|| panic!("a ScaledObject {name}"));
        assert_eq!(s(&so["spec"]["scaleTargetRef"]["name"]), name);
        assert!(named(&all, "Deployment", &name).is_some());
        let trigger = &so["spec"]["triggers"][0];
        assert_eq!(trigger["type"], "rabbitmq");
        assert_eq!(s(&trigger["metadata"]["queueName"]), names.queue(stage), "{name} watches its own queue");
        let auth = named(&all, "TriggerAuthentication", s(&trigger["authenticationRef"]["name"]))
            .expect("the trigger's authentication exists");
        for r in auth["spec"]["secretTargetRef"].as_sequence().unwrap() {
            let secret = named(&all, "Secret", s(&r["name"])).expect("its Secret exists");
            assert!(secret["stringData"].get(s(&r["key"])).is_some(), "the Secret has key {}", s(&r["key"]));
        }
        assert_eq!(so["spec"]["minReplicaCount"], 0, "{name} may scale to zero");
    }
}
