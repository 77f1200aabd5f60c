//! Rate limits and calls by capability, against real plugin processes:
//! limits measured by hammering (not assumed), capability calls that reach a
//! provider and fail over when it stops.

use plugvisor::{Error, PluginState};
use plugvisor_integration_tests::{Sandbox, bin, wait_state};
use prost::bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SECS_10: Duration = Duration::from_secs(10);

/// Calls `method` from `callers` tasks as fast as they can for `run`;
/// returns (accepted, refused, seconds from the first call to the last).
async fn hammer(
    sup: &plugvisor::Supervisor,
    plugin: &str,
    method: &str,
    callers: usize,
    run: Duration,
) -> (u64, u64, f64) {
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (sup, accepted, refused) = (sup.clone(), accepted.clone(), refused.clone());
        let (plugin, method) = (plugin.to_string(), method.to_string());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < run {
                match sup
                    .call(
                        &plugin,
                        &method,
                        Bytes::from_static(b"x"),
                        Default::default(),
                        None,
                    )
                    .await
                {
                    Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                        assert!(matches!(e, Error::RateLimited { .. }), "{e}");
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    (
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        took,
    )
}

/// `accepted` is `rate * seconds + burst` within 5% (and 3 calls).
fn assert_near(what: &str, accepted: u64, rate: f64, burst: f64, seconds: f64) {
    let expected = rate * seconds + burst;
    let tolerance = expected * 0.05 + 3.0;
    assert!(
        (accepted as f64 - expected).abs() <= tolerance,
        "{what}: {accepted} calls accepted in {seconds:.3}s; expected {expected:.0} ± {tolerance:.0} (rate {rate}/s, burst {burst})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_answers_resource_exhausted_beyond_rate_times_time_plus_burst() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "limited",
            &bin("echo-plugin"),
            "calls: {rate: 200/s, burst: 50, methods: {upper: {rate: 20/s, burst: 5}}}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "limited", PluginState::Ready, SECS_10).await;

    // Four callers at full speed for 2 s: far above 200/s unlimited.
    let (accepted, refused, seconds) =
        hammer(&sup, "limited", "echo", 4, Duration::from_secs(2)).await;
    println!("echo: {accepted} accepted, {refused} refused in {seconds:.3}s");
    assert!(refused > accepted, "the callers went well over the rate");
    assert_near("the plugin's limit", accepted, 200.0, 50.0, seconds);

    // The method's own limit, tighter, holds as well (the plugin's bucket
    // refills meanwhile at 200/s, more than `upper` may take).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (accepted, refused, seconds) =
        hammer(&sup, "limited", "upper", 2, Duration::from_millis(1500)).await;
    println!("upper: {accepted} accepted, {refused} refused in {seconds:.3}s");
    assert_near("the method's limit", accepted, 20.0, 5.0, seconds);

    // Counted in metrics, by limit.
    let text = sup.metrics_text();
    let count = |labels: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("plugvisor_calls_rate_limited_total{{{labels}}} "))
            })
            .unwrap_or_else(|| panic!("no series {labels} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(count(r#"plugin="limited",method="upper",limit="method""#) >= refused as f64 - 0.5);
    assert!(count(r#"plugin="limited",method="*",limit="plugin""#) > 0.0);
    assert!(
        text.contains(
            r#"plugvisor_calls_total{plugin="limited",method="echo",code="ResourceExhausted"}"#
        ),
        "refusals are calls too:\n{text}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn the_retry_hint_is_true_and_an_upgrade_keeps_the_limit() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    let manifest = || sandbox.manifest("slow", &bin("echo-plugin"), "calls: {rate: 4/s, burst: 2}");
    sup.add(manifest(), &Default::default()).unwrap();
    wait_state(&mut events, "slow", PluginState::Ready, SECS_10).await;
    let call = || sup.call("slow", "echo", Bytes::new(), Default::default(), None);
    call().await.unwrap();
    call().await.unwrap();
    let refused = call().await.unwrap_err();
    let status = tonic::Status::from(refused);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let hint: u64 = status
        .metadata()
        .get(plugvisor::error::RETRY_AFTER_MS)
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=250).contains(&hint), "one token every 250ms: {hint}");
    assert!(
        status.message().contains(&format!("retry in {hint}ms")),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("4/s, burst 2"),
        "{}",
        status.message()
    );
    // Waiting as told is enough.
    tokio::time::sleep(Duration::from_millis(hint)).await;
    call().await.expect("the hint was long enough");
    let inspect = sup.info("slow").unwrap();
    assert_eq!(
        inspect.rate_limits,
        [("*".to_string(), "4/s, burst 2".to_string())]
    );

    // An upgrade to the same limit does not refill the bucket; one to a
    // new limit puts it in force.
    let minute = |rate: &str| {
        sandbox.manifest(
            "minute",
            &bin("echo-plugin"),
            &format!("calls: {{rate: {rate}}}"),
        )
    };
    sup.add(minute("1/m"), &Default::default()).unwrap();
    wait_state(&mut events, "minute", PluginState::Ready, SECS_10).await;
    let call = || sup.call("minute", "echo", Bytes::new(), Default::default(), None);
    call().await.unwrap();
    call().await.unwrap_err();
    sup.upgrade("minute", minute("1/m")).await.unwrap();
    let err = call().await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err}");
    sup.upgrade("minute", minute("120/m")).await.unwrap();
    call().await.expect("the new limit is in force");
    assert_eq!(
        sup.info("minute").unwrap().rate_limits,
        [("*".to_string(), "2/s, burst 2".to_string())]
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_call_by_capability_reaches_a_provider_and_fails_over_when_it_stops() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    for name in ["img-a", "img-b"] {
        sup.add(
            sandbox.manifest(
                name,
                &bin("echo-plugin"),
                "capabilities: [image.resize, image.thumbnail]",
            ),
            &Default::default(),
        )
        .unwrap();
    }
    sup.add(
        sandbox.manifest("text", &bin("echo-plugin"), "capabilities: [text.upper]"),
        &Default::default(),
    )
    .unwrap();
    // Waiting on each in turn: events of the others are not consumed.
    for name in ["img-a", "img-b", "text"] {
        sup.wait_ready(name, SECS_10).await.unwrap();
    }
    let providers: Vec<_> = sup
        .providers("image.resize")
        .into_iter()
        .map(|(p, l)| (p.plugin, l.ready))
        .collect();
    assert_eq!(providers.len(), 2, "{providers:?}");
    assert!(providers.iter().all(|(_, ready)| *ready));
    assert_eq!(
        sup.info("img-a").unwrap().capabilities,
        ["image.resize", "image.thumbnail"]
    );

    let call = |cap: &'static str| {
        let sup = sup.clone();
        async move {
            sup.call_capability(
                cap,
                "upper",
                Bytes::from_static(b"pic"),
                Default::default(),
                Some(SECS_10),
            )
            .await
        }
    };
    // Idle providers take calls in turn.
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (provider, reply) = call("image.resize").await.unwrap();
        assert_eq!(&reply.payload[..], b"PIC");
        reached.insert(provider);
    }
    assert_eq!(reached.len(), 2, "both providers were used: {reached:?}");
    let (provider, _) = call("text.upper").await.unwrap();
    assert_eq!(provider, "text");

    // The first stops: every call goes to the other.
    sup.stop("img-a").await.unwrap();
    for _ in 0..4 {
        let (provider, _) = call("image.resize").await.unwrap();
        assert_eq!(provider, "img-b");
    }
    // Both stopped: an answer at once, not a wait until the deadline.
    sup.stop("img-b").await.unwrap();
    let started = Instant::now();
    let err = call("image.resize").await.unwrap_err();
    assert!(matches!(err, Error::NoProvider { .. }), "{err}");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains("img-a is stopped"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A provider starting again: the call waits for it.
    sup.start("img-b").await.unwrap();
    let (provider, _) = call("image.thumbnail").await.unwrap();
    assert_eq!(provider, "img-b");

    let err = call("image.crop").await.unwrap_err();
    assert!(matches!(err, Error::UnknownCapability(_)), "{err}");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A removed plugin provides nothing any more.
    sup.remove("text").await.unwrap();
    assert!(matches!(
        call("text.upper").await.unwrap_err(),
        Error::UnknownCapability(_)
    ));
    sup.shutdown().await;
}
