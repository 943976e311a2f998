//! What can be checked of the compose stack without a Docker engine: the files parse, every
//! setting a service is given is one txpipe reads (and accepts), each service runs a binary
//! the Dockerfile ships, workers can be scaled, and each RabbitMQ user's permissions allow
//! exactly what its service does with the names of DESIGN.md, and Prometheus scrapes with an
//! API key a one-shot service makes into a volume they share, and every service's spans reach
//! Jaeger through the OpenTelemetry Collector.

use regex::Regex;
use serde_json::Value as Json;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use txpipe_common::stage::{Service, Stage};
use txpipe_common::{Names, Settings};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const BINARIES: [&str; 5] = ["txpipe", "ingest-gateway", "validator", "transformer", "notifier"];
const TXPIPE_SERVICES: [&str; 5] = ["provision", "gateway", "validator", "transformer", "notifier"];
/// The AWS SDK's own variables a service may be given.
const AWS_VARS: [&str; 8] = [
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
];
/// The standard OpenTelemetry variables a service may be given (the exporter reads them).
const OTEL_VARS: [&str; 6] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
];

fn compose() -> Value {
    let text = std::fs::read_to_string(format!("{ROOT}/compose/compose.yaml")).expect("compose/compose.yaml");
    let mut v: Value = serde_yaml_ng::from_str(&text).expect("compose.yaml is valid YAML");
    v.apply_merge().expect("YAML merge keys resolve");
    // merge keys nest: resolve the ones inside services too
    if let Some(services) = v.get_mut("services").and_then(Value::as_mapping_mut) {
        for (_, svc) in services.iter_mut() {
            svc.apply_merge().unwrap();
            if let Some(env) = svc.get_mut("environment") {
                env.apply_merge().unwrap();
            }
        }
    }
    v
}

fn env_of(svc: &Value) -> BTreeMap<String, String> {
    let Some(env) = svc.get("environment").and_then(Value::as_mapping) else { return BTreeMap::new() };
    env.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

#[test]
fn every_service_is_there_and_runs_a_shipped_binary() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    for name in ["rabbitmq", "minio", "dynamodb"].iter().chain(TXPIPE_SERVICES.iter()) {
        assert!(services.contains_key(*name), "service {name} missing");
    }
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/compose/Dockerfile")).unwrap();
    for bin in BINARIES {
        assert!(dockerfile.contains(&format!("target/release/{bin}")), "the Dockerfile does not ship {bin}");
    }
    for name in TXPIPE_SERVICES {
        let svc = &c["services"][name];
        let cmd = svc["command"][0].as_str().unwrap_or_else(|| panic!("{name} has a command"));
        assert!(BINARIES.contains(&cmd), "{name} runs {cmd}, which is not a txpipe binary");
    }
    for worker in ["validator", "transformer", "notifier"] {
        let svc = &c["services"][worker];
        assert!(svc.get("container_name").is_none(), "{worker} must be scalable: no container_name");
        assert!(svc.get("ports").is_none(), "{worker} must be scalable: no host ports");
        assert!(svc.get("healthcheck").is_some(), "{worker} has a healthcheck");
    }
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own large error
fn every_setting_given_is_one_txpipe_reads_and_accepts() {
    let c = compose();
    let known: Vec<String> = match serde_json::to_value(Settings::default()).unwrap() {
        Json::Object(m) => m.keys().cloned().collect(),
        _ => unreachable!(),
    };
    for name in TXPIPE_SERVICES {
        let env = env_of(&c["services"][name]);
        assert!(env.contains_key("TXPIPE_AMQP_URL"), "{name} names its broker user");
        for key in env.keys() {
            match key.strip_prefix("TXPIPE_") {
                Some(field) => assert!(known.contains(&field.to_lowercase()), "{name}: {key} is not a txpipe setting"),
                None => assert!(
                    AWS_VARS.contains(&key.as_str()) || OTEL_VARS.contains(&key.as_str()),
                    "{name}: {key} is neither a txpipe, an AWS SDK nor an OpenTelemetry variable"
                ),
            }
        }
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in &env {
                jail.set_env(k, v);
            }
            let settings = Settings::load().map_err(|e| format!("{name}: {e}"))?;
            assert_eq!(settings.namespace, "txpipe", "the definitions are written for namespace txpipe");
            Ok(())
        });
    }
}

/// What a service does on the broker, from the stage table: (configure, write, read) resources.
/// It declares the exchanges and the DLQ, and its own queue (declaring a queue with a
/// dead-letter exchange needs read on it, the right to consume it, so the other stages' queues
/// are provisioned by an admin: see docs/DESIGN.md, "Least privilege and the topology").
fn needs(service: Service, n: &Names) -> (Vec<String>, Vec<String>, Vec<String>) {
    let exchanges = vec![n.pipeline_exchange(), n.notifications_exchange(), n.dead_letter_exchange()];
    let own: Vec<String> = service.consumes().iter().map(|s| n.queue(*s)).collect();
    let mut configure = exchanges;
    configure.push(n.dead_letter_queue());
    configure.extend(own.clone());
    // binding a queue needs write on the queue and read on the exchange
    let mut write = own;
    write.push(n.dead_letter_queue());
    let mut read = vec![n.pipeline_exchange(), n.dead_letter_exchange()];
    if !service.publishes().is_empty() {
        write.push(n.pipeline_exchange());
    }
    if let Some(stage) = service.consumes() {
        // every worker may dead-letter a message and announce a file's failure
        write.extend([n.dead_letter_exchange(), n.notifications_exchange()]);
        read.push(n.queue(stage));
    }
    let (stage_events, notifications) = service.hears();
    if !stage_events.is_empty() || !notifications.is_empty() {
        // a queue of its own for the events it hears: declared, bound, consumed
        let own = format!("{}0123456789abcdef0123456789abcdef", n.gateway_queue_prefix());
        configure.push(own.clone());
        write.push(own.clone());
        read.push(own);
        if !notifications.is_empty() {
            read.push(n.notifications_exchange());
        }
    }
    (configure, write, read)
}

#[test]
fn each_broker_user_may_do_what_its_service_does_and_no_more() {
    let text = std::fs::read_to_string(format!("{ROOT}/compose/rabbitmq/definitions.json")).unwrap();
    let defs: Json = serde_json::from_str(&text).expect("definitions.json is valid JSON");
    let n = Names::new("txpipe").unwrap();
    let c = compose();
    for svc in Service::ALL {
        let service = svc.name();
        let user = format!("txpipe-{service}");
        assert!(
            defs["users"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["name"] == user.as_str() && u["password_hash"].is_string()),
            "user {user} is defined"
        );
        let url = env_of(&c["services"][service])["TXPIPE_AMQP_URL"].clone();
        assert!(url.starts_with(&format!("amqp://{user}:")), "{service} connects as {user}: {url}");
        let perm =
            defs["permissions"].as_array().unwrap().iter().find(|p| p["user"] == user.as_str()).expect("permissions");
        let re = |k: &str| Regex::new(perm[k].as_str().unwrap()).unwrap();
        let (configure, write, read) = needs(svc, &n);
        for (kind, wanted) in [("configure", &configure), ("write", &write), ("read", &read)] {
            let r = re(kind);
            for name in wanted.iter() {
                assert!(r.is_match(name), "{user} needs {kind} on {name}");
            }
            // nothing of another namespace, and nothing beyond what the service uses
            assert!(!r.is_match("other.pipeline"), "{user}: {kind} reaches outside namespace txpipe");
            for q in Stage::ALL.map(|s| n.queue(s)) {
                if !wanted.contains(&q) {
                    assert!(!r.is_match(&q), "{user} must not have {kind} on {q}");
                }
            }
        }
        assert!(
            svc == Service::Gateway || !re("read").is_match(&n.dead_letter_queue()),
            "{user} must not consume the DLQ"
        );
    }
    assert!(!Regex::new(
        defs["permissions"].as_array().unwrap().iter().find(|p| p["user"] == "txpipe-notifier").unwrap()["write"]
            .as_str()
            .unwrap()
    )
    .unwrap()
    .is_match(&n.pipeline_exchange()));
}

#[test]
fn prometheus_scrapes_every_service_and_alerts_only_on_metrics_txpipe_records() {
    let c = compose();
    assert!(c["services"].get("prometheus").is_some(), "a prometheus service");
    let text = std::fs::read_to_string(format!("{ROOT}/compose/prometheus/prometheus.yml")).unwrap();
    let prom: Value = serde_yaml_ng::from_str(&text).expect("prometheus.yml is valid YAML");
    let jobs: Vec<String> =
        prom["scrape_configs"].as_sequence().unwrap().iter().map(|j| serde_yaml_ng::to_string(j).unwrap()).collect();
    for (service, port) in [("gateway", 8080), ("validator", 9101), ("transformer", 9102), ("notifier", 9103)] {
        assert!(
            jobs.iter().any(|j| j.contains(service) && j.contains(&port.to_string())),
            "{service}:{port} is scraped"
        );
        let addr = env_of(&c["services"][service])["TXPIPE_HTTP_ADDR"].clone();
        assert!(addr.ends_with(&format!(":{port}")), "{service} serves /metrics on {port}: {addr}");
    }
    // /metrics needs a key: every job sends the one the metrics-key service keeps
    let key_file = "/etc/prometheus/keys/prometheus";
    for job in prom["scrape_configs"].as_sequence().unwrap() {
        assert_eq!(
            job["authorization"]["credentials_file"].as_str(),
            Some(key_file),
            "job {:?} scrapes with the API key",
            job["job_name"]
        );
    }
    let text = std::fs::read_to_string(format!("{ROOT}/compose/prometheus/alerts.yml")).unwrap();
    let alerts: Value = serde_yaml_ng::from_str(&text).expect("alerts.yml is valid YAML");
    let metric = Regex::new(r"txpipe_[a-z_]+").unwrap();
    let known = txpipe_common::metrics::names();
    let mut rules = 0;
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            rules += 1;
            let expr = rule["expr"].as_str().expect("each rule has an expr");
            for m in metric.find_iter(expr) {
                let name = m.as_str();
                // job names like txpipe-gateway are not metrics; label values are not either
                assert!(known.iter().any(|k| k == name), "alert uses unknown metric {name}");
            }
        }
    }
    assert!(rules >= 3);
}

#[test]
fn third_party_images_are_pinned_and_every_store_has_a_healthcheck() {
    let c = compose();
    for (name, svc) in c["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let image = svc["image"].as_str().unwrap_or_else(|| panic!("{name} names its image"));
        if svc.get("build").is_some() || image.starts_with("txpipe:") {
            continue; // txpipe's own image, built from compose/Dockerfile
        }
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(!tag.is_empty() && tag != "latest" && !tag.contains('/'), "{name}: {image} is not pinned to a version");
    }
    for store in ["rabbitmq", "minio", "dynamodb"] {
        assert!(c["services"][store].get("healthcheck").is_some(), "{store} has a healthcheck");
        assert_eq!(
            c["services"]["provision"]["depends_on"][store]["condition"], "service_healthy",
            "provision waits for {store} to be healthy"
        );
    }
}

#[test]
fn grafana_shows_the_dashboard_and_it_uses_only_metrics_txpipe_records() {
    let c = compose();
    let grafana = &c["services"]["grafana"];
    let mounts: Vec<&str> = grafana["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(mounts.iter().any(|m| m.starts_with("./grafana/provisioning:/etc/grafana/provisioning")));
    let text =
        std::fs::read_to_string(format!("{ROOT}/compose/grafana/provisioning/datasources/prometheus.yml")).unwrap();
    let ds: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    let text = std::fs::read_to_string(format!("{ROOT}/compose/grafana/provisioning/dashboards/txpipe.yml")).unwrap();
    let provider: Value = serde_yaml_ng::from_str(&text).unwrap();
    let path = provider["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(
        mounts.iter().any(|m| m.ends_with(&format!(":{path}:ro"))),
        "the dashboards are mounted where Grafana looks"
    );

    let text = std::fs::read_to_string(format!("{ROOT}/compose/grafana/dashboards/txpipe.json")).unwrap();
    let dash: Json = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let metric = Regex::new(r"txpipe_[a-z_]+").unwrap();
    let known = txpipe_common::metrics::names();
    let mut used = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            for m in metric.find_iter(target["expr"].as_str().unwrap()) {
                // a histogram's series carry suffixes
                let name = ["_bucket", "_count", "_sum"].iter().fold(m.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(known.iter().any(|k| k == name), "the dashboard uses unknown metric {name}");
                used.insert(name.to_owned());
            }
        }
    }
    // uploads and refusals, files by final status, each stage's throughput and latency, the
    // DLQ, the broker link, storage calls
    for wanted in [
        "txpipe_uploads_total",
        "txpipe_files_finished_total",
        "txpipe_messages_total",
        "txpipe_message_seconds",
        "txpipe_dlq_messages",
        "txpipe_broker_connected",
        "txpipe_storage_calls_total",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own large error
fn a_one_shot_service_makes_prometheus_an_api_key_in_a_volume_they_share() {
    let c = compose();
    let svc = &c["services"]["metrics-key"];
    let cmd: Vec<&str> = svc["command"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(cmd[..4], ["txpipe", "keys", "ensure", "prometheus"], "{cmd:?}");
    let file = cmd.iter().position(|a| *a == "--file").map(|i| cmd[i + 1]).expect("--file");
    assert_eq!(svc["depends_on"]["provision"]["condition"], "service_completed_successfully");
    let mount = |svc: &Value, volume: &str| -> Option<String> {
        svc["volumes"].as_sequence()?.iter().filter_map(Value::as_str).find_map(|m| {
            let mut parts = m.split(':');
            (parts.next() == Some(volume)).then(|| parts.next().unwrap_or_default().to_owned())
        })
    };
    let written_in = mount(svc, "metrics-key").expect("metrics-key mounts the key volume");
    assert!(file.starts_with(&format!("{written_in}/")), "{file} is in the volume at {written_in}");
    let prometheus = &c["services"]["prometheus"];
    let read_in = mount(prometheus, "metrics-key").expect("prometheus mounts the key volume");
    assert_eq!(read_in, "/etc/prometheus/keys");
    assert_eq!(format!("{read_in}/{}", file.rsplit('/').next().unwrap()), "/etc/prometheus/keys/prometheus");
    assert_eq!(prometheus["depends_on"]["metrics-key"]["condition"], "service_completed_successfully");
    assert!(c["volumes"].get("metrics-key").is_some(), "the volume is declared");
    // it uses the same storage as the services, with settings txpipe accepts
    let env = env_of(svc);
    assert_eq!(env.get("TXPIPE_STORAGE").map(String::as_str), Some("aws"));
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        for (k, v) in &env {
            jail.set_env(k, v);
        }
        Settings::load().map_err(|e| format!("metrics-key: {e}"))?;
        Ok(())
    });
}

#[test]
fn every_service_sends_its_spans_through_the_collector_to_jaeger() {
    let c = compose();
    for name in ["gateway", "validator", "transformer", "notifier"] {
        let env = env_of(&c["services"][name]);
        assert_eq!(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(String::as_str),
            Some("http://otel-collector:4318"),
            "{name} exports its spans to the collector (OTLP/HTTP)"
        );
        assert!(!env.contains_key("OTEL_SERVICE_NAME"), "{name}: each binary names itself");
    }
    let collector = &c["services"]["otel-collector"];
    let mounted = collector["volumes"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect::<Vec<_>>();
    assert!(mounted.contains(&"./otel-collector/config.yaml:/etc/otelcol/config.yaml:ro"), "{mounted:?}");
    let config: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(format!("{ROOT}/compose/otel-collector/config.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["receivers"]["otlp"]["protocols"]["http"]["endpoint"], "0.0.0.0:4318");
    let traces = &config["service"]["pipelines"]["traces"];
    assert_eq!(traces["receivers"][0], "otlp");
    let exporter = traces["exporters"][0].as_str().unwrap();
    let endpoint = config["exporters"][exporter]["endpoint"].as_str().unwrap();
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    assert!(c["services"].get(host).is_some(), "the collector exports to {host}, a service of the stack");
    assert_eq!(port, "4317", "Jaeger takes OTLP/gRPC on 4317");
    assert!(c["services"]["jaeger"]["image"].as_str().unwrap().starts_with("jaegertracing/"));
}
