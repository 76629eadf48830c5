//! A local EVM node for tests and `--chain anvil`: the pinned anvil from chain/node_modules
//! (installed by scripts/setup with `npm ci`), on a free loopback port, killed when dropped.

use super::ChainError;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Anvil's chain id.
pub const ANVIL_CHAIN_ID: u64 = 31337;
/// How long anvil may take to answer its first request.
pub const ANVIL_START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AnvilNode {
    child: Child,
    pub url: String,
    pub port: u16,
}

/// Where the pinned anvil is: `$CORTENSOR_ANVIL`, else chain/node_modules under the current
/// directory, else under the source tree this binary was built from. The platform package's
/// binary itself, not npm's Node.js wrapper: signals must reach anvil (a SIGKILL to the
/// wrapper would leave anvil running).
pub fn anvil_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CORTENSOR_ANVIL") {
        return PathBuf::from(p);
    }
    let here = Path::new("chain/node_modules");
    let modules = if here.exists() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(here)
    };
    let platform = std::fs::read_dir(modules.join("@foundry-rs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/anvil"))
        .find(|p| p.is_file());
    platform.unwrap_or_else(|| modules.join(".bin/anvil"))
}

impl AnvilNode {
    /// Starts anvil; with `state`, it loads and saves its chain there (so a restart keeps it).
    pub fn start(state: Option<&Path>) -> Result<Self, ChainError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| ChainError::Evm(format!("no free port: {e}")))?
            .port();
        Self::start_on(port, state)
    }

    /// Starts anvil on a given port (a restart of a node clients already know).
    pub fn start_on(port: u16, state: Option<&Path>) -> Result<Self, ChainError> {
        let binary = anvil_binary();
        if !binary.exists() {
            return Err(ChainError::Evm(format!(
                "anvil not found at {}: run scripts/setup (it installs chain/node_modules)",
                binary.display()
            )));
        }
        let mut cmd = Command::new(&binary);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--silent",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(state) = state {
            // Loaded at start, saved every second and at a graceful exit.
            cmd.arg("--state")
                .arg(state)
                .args(["--state-interval", "1"]);
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death
            // signal, so anvil stops (and saves its state) when the thread that started it
            // ends, even if this process is killed.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| ChainError::Evm(format!("cannot start {}: {e}", binary.display())))?;
        let mut node = AnvilNode {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        node.wait_ready()?;
        Ok(node)
    }

    fn wait_ready(&mut self) -> Result<(), ChainError> {
        let started = Instant::now();
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| ChainError::Evm(e.to_string()))?;
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []});
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ChainError::Evm(format!("anvil exited at start ({status})")));
            }
            if http
                .post(&self.url)
                .json(&body)
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if started.elapsed() > ANVIL_START_TIMEOUT {
                return Err(ChainError::Evm(format!(
                    "anvil did not answer within {ANVIL_START_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the node as a crash would (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the node gracefully (SIGINT, so it saves its state), then by force after 5 s.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for AnvilNode {
    fn drop(&mut self) {
        self.stop();
    }
}
