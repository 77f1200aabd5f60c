//! Figure 2b: Handle 64 B, one caller, embedded, to the echo plugin served
//! over TCP + mutual TLS on loopback (a `remote:` manifest), as a ratio to
//! the same call over the Unix socket.

use super::{BoxError, PAYLOAD, Result, Setup, payload};
use plugvisor::Supervisor;
use plugvisor_integration_tests::tls::Pki;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The TLS echo plugin, killed on drop.
struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Samples of one-caller Handle latency to a remote echo plugin.
pub async fn latency(
    root: &Path,
    bins: &Setup,
    sup: &Supervisor,
    warmup: usize,
    count: usize,
) -> Result<Vec<Duration>> {
    let dir = root.join("tls");
    std::fs::create_dir_all(dir.join("echo-tls"))?;
    let pki = Pki::new(&dir, "bench");
    let server = pki.issue("plugin", &["echo.bench"]);
    let client = pki.issue("client", &["plugvisor"]);
    let mut child = Command::new(&bins.echo)
        .env_clear()
        .env("PLUGVISOR_TLS_LISTEN", "127.0.0.1:0")
        .env("PLUGVISOR_TLS_CERT", &server.cert)
        .env("PLUGVISOR_TLS_KEY", &server.key)
        .env("PLUGVISOR_TLS_CLIENT_CA", &pki.ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let plugin = Plugin(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let address = line
        .trim()
        .strip_prefix("plugvisor|1|tls|")
        .ok_or_else(|| format!("the TLS echo plugin printed {line:?}"))?
        .to_string();
    let manifest = dir.join("echo-tls/plugin.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: echo-tls\nversion: 1.0.0\nremote: {{address: \"{address}\", ca: {}, cert: {}, key: {}, identity: echo.bench}}\n",
            pki.ca.display(),
            client.cert.display(),
            client.key.display()
        ),
    )?;
    sup.add(
        plugvisor::manifest::Manifest::load(&manifest)?,
        &Default::default(),
    )?;
    sup.wait_ready("echo-tls", Duration::from_secs(30)).await?;
    let task_sup = sup.clone();
    let samples = tokio::spawn(async move {
        let payload = payload();
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = Instant::now();
            let reply = task_sup
                .call("echo-tls", "echo", payload.clone(), HashMap::new(), None)
                .await?;
            if reply.payload.len() != PAYLOAD {
                return Err::<Vec<Duration>, BoxError>("a short TLS echo".into());
            }
            if i >= warmup {
                samples.push(t.elapsed());
            }
        }
        Ok(samples)
    })
    .await??;
    let _ = sup.remove("echo-tls").await;
    drop(plugin);
    Ok(samples)
}
