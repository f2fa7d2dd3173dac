//! What a feature costs: the same three-node cluster, started afresh for each round with a
//! nats-server (with JetStream) of its own, measured with the feature off and on, in
//! alternating rounds so that drift of the machine falls on both. Each round measures write throughput
//! (`create_supervisor` from `writers` concurrent clients) and the latency of sequential
//! calls to one `counter` agent.
//! - `--metrics-cost`: metrics off (no listener: nothing is counted) against on (every node
//!   serves `/metrics`, scraped every second, a far shorter interval than Prometheus's
//!   default 15 s); the history on in both.
//! - `--history-cost`: the history off (`[history] enabled = false`: no outbox, nothing
//!   published) against on (every node writes its outbox, the leader publishes every event
//!   to JetStream); metrics off in both.
//! - `--traces-cost`: traces off (no `[traces]`) against on at the default 1% sampling, every
//!   node exporting to an OTLP/HTTP receiver in the bench's process (`traces::sink`, which
//!   decodes every export as a collector would); metrics off, the history on in both.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{drive, Figures};
use crate::up::{connect_as, LocalCluster, NatsServer};

/// What is switched off and on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Metrics,
    History,
    Traces,
}

/// What to run.
pub struct Setup {
    pub feature: Feature,
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub cluster: String,
    /// Each measurement's length.
    pub duration: Duration,
    /// Concurrent writers.
    pub writers: usize,
    /// Rounds of each setting (alternating, off first, after a round that warms up).
    pub rounds: usize,
}

/// One round's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    /// The feature on.
    pub on: bool,
    pub writes: Figures,
    pub calls: Figures,
    /// Scrapes answered during the round (0 with metrics off).
    pub scrapes: u64,
    /// Spans the receiver got during the round (0 with traces off).
    pub spans: u64,
}

/// Runs the rounds. Everything it starts is stopped when it returns.
pub async fn run(setup: &Setup) -> anyhow::Result<Vec<Round>> {
    std::fs::create_dir_all(&setup.dir)?;
    let auth = setup.dir.join("auth");
    crate::auth::ensure(&auth, &setup.cluster, 3)?;
    let sink = crate::traces::sink::Sink::start(0).await?;
    let mut rounds = Vec::new();
    // Round 0 warms the machine up (page cache, CPU frequency, nats-server's first store) and
    // is not counted: in every run, whatever went first was the slowest by 5 to 15%.
    for r in 0..=setup.rounds * 2 {
        let on = r % 2 == 0 && r > 0;
        let metrics = on && setup.feature == Feature::Metrics;
        // A nats-server of its own each round: a history stream left by the round before (a
        // cluster of the same name) would make this round's leader skip its events up to that
        // stream's end (docs/protocol.md, "History"), and cost nothing it should.
        let round_dir = setup.dir.join(format!("round-{r}"));
        std::fs::create_dir_all(&round_dir)?;
        let server = NatsServer::start(&round_dir, &crate::up::auth_args(&auth)).await?;
        let mut nodes = LocalCluster::new(
            setup.bin.clone(),
            round_dir.join("nodes"),
            server.url.clone(),
            &setup.cluster,
        );
        nodes.auth = Some(auth.clone());
        if setup.feature == Feature::History && !on {
            nodes.config_toml = Some("[history]\nenabled = false\n".into());
        }
        if setup.feature == Feature::Traces && on {
            let traces = format!(
                "[traces]\nendpoint = {:?}\nsample_ratio = 0.01\n",
                sink.endpoint
            );
            nodes.config_toml = Some(traces);
        }
        let spans_before = sink.received();
        if metrics {
            let ports = crate::netfault::free_ports(3)?;
            for (id, port) in (1..=3u64).zip(ports) {
                nodes.node_metrics.insert(id, format!("127.0.0.1:{port}"));
            }
        }
        for id in 1..=3u64 {
            nodes.start_node(id, id == 1).await?;
        }
        let client = connect_as(&server.url, &setup.cluster, Some(&auth), "admin").await?;
        nodes
            .wait_ready(&client, 3, Duration::from_secs(60))
            .await?;
        let addrs: Vec<String> = nodes.node_metrics.values().cloned().collect();
        let (stop_scraper, scraped) = tokio::sync::watch::channel(false);
        let scraper = tokio::spawn(scrape_every_second(addrs, scraped));

        let parent = format!("mc-{r}");
        client
            .call("create_supervisor", &json!({"name": parent}))
            .await?;
        let c = client.clone();
        let p = parent.clone();
        let writes = drive(setup.writers, setup.duration, move |w, i| {
            let (c, p) = (c.clone(), p.clone());
            async move {
                let name = format!("{p}-{w}-{i}");
                c.call("create_supervisor", &json!({"name": name, "parent": p}))
                    .await
                    .is_ok()
            }
        })
        .await;
        let agent = format!("{parent}-counter");
        let body =
            json!({"name": agent, "supervisor": parent, "kind": "counter", "wait": "running"});
        client.call("spawn_agent", &body).await?;
        let c = client.clone();
        let calls = drive(1, setup.duration, move |_, _| {
            let (c, agent) = (c.clone(), agent.clone());
            async move {
                c.call_agent(&agent, &json!({"op": "add", "n": 1}))
                    .await
                    .is_ok()
            }
        })
        .await;
        let _ = stop_scraper.send(true);
        let scrapes = scraper.await.unwrap_or(0);
        nodes.stop_all(Duration::from_secs(10)).await;
        if r == 0 {
            continue;
        }
        rounds.push(Round {
            on,
            writes,
            calls,
            scrapes,
            spans: sink.received() - spans_before,
        });
    }
    Ok(rounds)
}

/// Scrapes every address once a second until `stop`; returns the scrapes answered.
async fn scrape_every_second(
    addrs: Vec<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let mut answered = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Bounded by the round: it ends when told.
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return answered,
            _ = tick.tick() => {}
        }
        for addr in &addrs {
            if scrape(addr).await {
                answered += 1;
            }
        }
    }
}

/// One `GET /metrics`; whether it came back whole within 5 s.
async fn scrape(addr: &str) -> bool {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(body.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), fetch).await,
        Ok(Some(true))
    )
}

/// The figures as ratios of metrics on to off, over all rounds of each.
pub fn summary(rounds: &[Round]) -> Value {
    let mean = |on: bool, f: &dyn Fn(&Round) -> f64| {
        let picked: Vec<f64> = rounds.iter().filter(|r| r.on == on).map(f).collect();
        picked.iter().sum::<f64>() / picked.len().max(1) as f64
    };
    let writes_off = mean(false, &|r| r.writes.per_sec);
    let writes_on = mean(true, &|r| r.writes.per_sec);
    let calls_off = mean(false, &|r| r.calls.p50_us as f64);
    let calls_on = mean(true, &|r| r.calls.p50_us as f64);
    let calls_p99_off = mean(false, &|r| r.calls.p99_us as f64);
    let calls_p99_on = mean(true, &|r| r.calls.p99_us as f64);
    json!({
        "writes_per_sec_off": writes_off,
        "writes_per_sec_on": writes_on,
        "write_throughput_on_vs_off": writes_on / writes_off.max(1e-9),
        "call_p50_us_off": calls_off,
        "call_p50_us_on": calls_on,
        "call_p50_on_vs_off": calls_on / calls_off.max(1e-9),
        "call_p99_on_vs_off": calls_p99_on / calls_p99_off.max(1e-9),
        "rounds": rounds,
    })
}

/// Prints `summary`'s figures.
pub fn print(feature: Feature, v: &Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let what = match feature {
        Feature::Metrics => "metrics on (every node scraped each second)",
        Feature::History => "history on (outboxes written, every event published to JetStream)",
        Feature::Traces => "traces on (1% of commands and calls sampled, exported over OTLP/HTTP)",
    };
    println!(
        "{what} against off: writes {:.0}/s against {:.0}/s = {:.3}x; call p50 {:.0} us against {:.0} us = {:.3}x (p99 {:.3}x)",
        f("writes_per_sec_on"),
        f("writes_per_sec_off"),
        f("write_throughput_on_vs_off"),
        f("call_p50_us_on"),
        f("call_p50_us_off"),
        f("call_p50_on_vs_off"),
        f("call_p99_on_vs_off"),
    );
    for r in v["rounds"].as_array().into_iter().flatten() {
        println!(
            "  on {:<5}: writes {:.0}/s ({} errors), call p50 {} us p99 {} us, {} scrapes, {} spans",
            r["on"],
            r["writes"]["per_sec"].as_f64().unwrap_or(0.0),
            r["writes"]["errors"],
            r["calls"]["p50_us"],
            r["calls"]["p99_us"],
            r["scrapes"],
            r["spans"],
        );
    }
}
