//! A small HTTP client for a running router, as any client would talk to it:
//! `cortensor session create` and `cortensor prompt`.

use anyhow::Context;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

pub struct Client {
    base: String,
    key: String,
    http: reqwest::blocking::Client,
}

/// A miner of `/api/v1/miners` that can take tasks: online, past its network tasks and not
/// suspended (in the pool, reserved, released or pinned).
pub fn is_ready(miner: &Value) -> bool {
    !["offline", "validating", "suspended"].contains(&miner["state"].as_str().unwrap_or(""))
}

/// How many miners of a `/api/v1/miners` answer are ready for tasks.
pub fn ready_miners(miners: &Value) -> usize {
    miners["nodes"]
        .as_object()
        .map_or(0, |n| n.values().filter(|m| is_ready(m)).count())
}

pub struct Answer {
    pub task_id: u64,
    pub text: String,
}

impl Client {
    pub fn new(base: &str, key: &str) -> Self {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(900))
            .build()
            .expect("a default HTTP client builds");
        Self {
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            http,
        }
    }

    /// A client of an HTTPS router whose certificate `ca` signs (or is).
    pub fn with_ca(base: &str, key: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let Some(ca) = ca else {
            return Ok(Self::new(base, key));
        };
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(900))
            .add_root_certificate(cert)
            .tls_built_in_root_certs(false)
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            http,
        })
    }

    fn check(response: reqwest::blocking::Response) -> anyhow::Result<reqwest::blocking::Response> {
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        let code = body["error"]["code"].as_str().unwrap_or("?");
        anyhow::bail!("the router answered {status} ({code}): {message}")
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .with_context(|| format!("cannot reach the router at {}", self.base))?;
        Ok(Self::check(r)?.json()?)
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<reqwest::blocking::Response> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .with_context(|| format!("cannot reach the router at {}", self.base))?;
        Self::check(r)
    }

    /// Miners ready for tasks (see [`is_ready`]).
    pub fn online_miners(&self) -> anyhow::Result<usize> {
        Ok(ready_miners(&self.get("/api/v1/miners")?))
    }

    /// Validators the router asks now (its `cortensor_validators` gauge).
    pub fn validators(&self) -> anyhow::Result<usize> {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.key)
            .send()
            .with_context(|| format!("cannot reach the router at {}", self.base))?;
        let text = Self::check(r)?.text()?;
        text.lines()
            .find_map(|l| l.strip_prefix("cortensor_validators "))
            .and_then(|n| n.trim().parse().ok())
            .context("the router's /metrics has no cortensor_validators")
    }

    pub fn create_session(&self, redundant: u32, name: &str) -> anyhow::Result<u64> {
        let body = json!({"name": name, "redundant": redundant, "min_num_of_nodes": 1, "max_num_of_nodes": redundant.max(1)});
        self.create_session_with(&body)
    }

    pub fn create_session_with(&self, body: &Value) -> anyhow::Result<u64> {
        let created: Value = self.post("/api/v1/sessions", body)?.json()?;
        created["session_id"]
            .as_u64()
            .context("the router's answer has no session_id")
    }

    pub fn task(&self, session: u64, task: u64) -> anyhow::Result<Value> {
        self.get(&format!("/api/v1/tasks/{session}/{task}"))
    }

    /// Sends a prompt; with `stream`, writes tokens to `out` as they arrive.
    pub fn complete(
        &self,
        session: u64,
        prompt: &str,
        max_tokens: usize,
        stream: bool,
        out: &mut dyn Write,
    ) -> anyhow::Result<Answer> {
        let body = json!({"session_id": session, "prompt": prompt, "max_tokens": max_tokens, "stream": stream});
        let response = self.post("/api/v1/completions", &body)?;
        if !stream {
            let v: Value = response.json()?;
            let text = v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let _ = write!(out, "{text}");
            return Ok(Answer {
                task_id: v["task_id"].as_u64().unwrap_or(0),
                text,
            });
        }
        let mut answer = Answer {
            task_id: 0,
            text: String::new(),
        };
        for line in BufReader::new(response).lines() {
            let line = line?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(data).context("a stream chunk is not JSON")?;
            if let Some(e) = chunk.get("error") {
                anyhow::bail!(
                    "the task failed: {}",
                    e["message"].as_str().unwrap_or("no details")
                );
            }
            answer.task_id = chunk["task_id"].as_u64().unwrap_or(answer.task_id);
            if let Some(t) = chunk["choices"][0]["text"].as_str() {
                answer.text.push_str(t);
                let _ = write!(out, "{t}");
                let _ = out.flush();
            }
        }
        Ok(answer)
    }
}

#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The router's base URL.
    #[arg(long, env = "CORTENSOR_URL", default_value = "http://127.0.0.1:5010")]
    pub url: String,
    /// An API key.
    #[arg(long, env = "CORTENSOR_API_KEY", default_value = crate::config::DEV_API_KEY)]
    pub key: String,
    /// For an https:// router: the CA (or its certificate) to trust, e.g. a testnet's
    /// <data-dir>/tls/ca.pem.
    #[arg(long, env = "CORTENSOR_CA")]
    pub ca: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionCommand {
    /// Create a session; prints its id.
    Create {
        #[command(flatten)]
        connection: Connection,
        #[arg(long, default_value = "")]
        name: String,
        /// Miners per task.
        #[arg(long, default_value_t = 1)]
        redundant: u32,
        #[arg(long, default_value_t = 1)]
        min_nodes: u32,
        #[arg(long)]
        max_nodes: Option<u32>,
        #[arg(long, default_value_t = 0)]
        validators: u32,
        /// 0 ephemeral, 1 hybrid, 2 dedicated.
        #[arg(long, default_value_t = 0)]
        mode: u8,
        #[arg(long)]
        deposit: Option<u64>,
    },
    /// Show a session.
    Show {
        #[command(flatten)]
        connection: Connection,
        id: u64,
    },
}

#[derive(Debug, clap::Args)]
pub struct PromptArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The session (default: the key's default session).
    #[arg(long)]
    pub session: Option<u64>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Wait for the whole answer instead of streaming tokens.
    #[arg(long)]
    pub no_stream: bool,
    pub prompt: String,
}

pub fn session(cmd: SessionCommand) -> anyhow::Result<()> {
    match cmd {
        SessionCommand::Create {
            connection,
            name,
            redundant,
            min_nodes,
            max_nodes,
            validators,
            mode,
            deposit,
        } => {
            let client =
                Client::with_ca(&connection.url, &connection.key, connection.ca.as_deref())?;
            let mut body = json!({
                "name": name, "redundant": redundant, "min_num_of_nodes": min_nodes,
                "max_num_of_nodes": max_nodes.unwrap_or(redundant.max(min_nodes)),
                "num_of_validator_nodes": validators, "mode": mode,
            });
            if let Some(d) = deposit {
                body["deposit"] = json!(d);
            }
            println!("{}", client.create_session_with(&body)?);
        }
        SessionCommand::Show { connection, id } => {
            let client =
                Client::with_ca(&connection.url, &connection.key, connection.ca.as_deref())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&client.get(&format!("/api/v1/sessions/{id}"))?)?
            );
        }
    }
    Ok(())
}

pub fn prompt(args: PromptArgs) -> anyhow::Result<()> {
    let client = Client::with_ca(
        &args.connection.url,
        &args.connection.key,
        args.connection.ca.as_deref(),
    )?;
    let session = match args.session {
        Some(s) => s,
        None => {
            let sessions = client.get("/api/v1/sessions")?;
            sessions["sessions"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "default"))
                .and_then(|s| s["session_id"].as_u64())
                .context("this key has no default session; pass --session")?
        }
    };
    let mut stdout = std::io::stdout();
    let answer = client.complete(
        session,
        &args.prompt,
        args.max_tokens,
        !args.no_stream,
        &mut stdout,
    )?;
    println!();
    eprintln!("[session {session}, task {}]", answer.task_id);
    Ok(())
}
