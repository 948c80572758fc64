//! `tally dead-letters`: list and replay the events that could not be
//! charged, through a running server's API (a replay is a write, and only the
//! server's writer writes).

use anyhow::{bail, Context};
use serde_json::Value;

#[derive(clap::Args)]
pub struct DeadLetterArgs {
    #[command(subcommand)]
    command: DeadLetterCommand,
    /// The server's base URL.
    #[arg(
        long,
        env = "TALLY_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// An API key (read scope to list, write to replay or discard).
    #[arg(long, env = "TALLY_API_KEY", global = true)]
    key: Option<String>,
}

#[derive(clap::Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first.
    List {
        /// pending (default), replayed, discarded or all.
        #[arg(long, default_value = "pending")]
        status: String,
        /// Only from this source: http, kafka, nats, pubsub, replay.
        #[arg(long)]
        source: Option<String>,
    },
    /// Send dead letters' events through again: the ids given (dl_1 dl_2), or every pending one.
    Replay {
        ids: Vec<String>,
        /// Replay every pending dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Give up on a dead letter.
    Discard {
        id: String,
        #[arg(long)]
        note: Option<String>,
    },
}

struct Api {
    client: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.url))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{status}: {}",
                body["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        Ok(body)
    }

    async fn pending(&self) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = "/v1/dead-letters?status=pending&limit=1000".to_string();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = self.call(reqwest::Method::GET, &path, None).await?;
            all.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return Ok(all),
            }
        }
    }
}

fn line(letter: &Value) -> String {
    let text = |field: &str| letter[field].as_str().unwrap_or("-").to_string();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\tx{}\t{}",
        text("id"),
        text("status"),
        text("source"),
        text("event_id"),
        text("customer_id"),
        text("code"),
        letter["attempts"],
        text("message")
    )
}

pub async fn run(args: DeadLetterArgs) -> anyhow::Result<()> {
    let Some(key) = args.key.filter(|k| !k.is_empty()) else {
        bail!("give an API key with --key or TALLY_API_KEY");
    };
    let api = Api {
        client: reqwest::Client::new(),
        url: args.url,
        key,
    };
    match args.command {
        DeadLetterCommand::List { status, source } => {
            let mut cursor: Option<String> = None;
            println!("id\tstatus\tsource\tevent\tcustomer\tcode\tattempts\tmessage");
            loop {
                let mut path = format!("/v1/dead-letters?status={status}&limit=1000");
                if let Some(source) = &source {
                    path.push_str(&format!("&source={source}"));
                }
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let page = api.call(reqwest::Method::GET, &path, None).await?;
                for letter in page["data"].as_array().into_iter().flatten() {
                    println!("{}", line(letter));
                }
                match page["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_string()),
                    None => return Ok(()),
                }
            }
        }
        DeadLetterCommand::Replay { ids, all } => {
            let ids: Vec<String> = if all {
                api.pending()
                    .await?
                    .iter()
                    .filter_map(|l| l["id"].as_str().map(str::to_owned))
                    .collect()
            } else if ids.is_empty() {
                bail!("give dead letter ids (dl_1 ...) or --all");
            } else {
                ids
            };
            let (mut charged, mut rejected) = (0, 0);
            for id in &ids {
                let replay = api
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/dead-letters/{id}/replay"),
                        None,
                    )
                    .await
                    .with_context(|| format!("replay {id}"))?;
                let status = replay["result"]["status"].as_str().unwrap_or("?");
                if status == "rejected" {
                    rejected += 1;
                    println!(
                        "{id}\trejected\t{}",
                        replay["result"]["error"]["code"].as_str().unwrap_or("?")
                    );
                } else {
                    charged += 1;
                    println!("{id}\t{status}");
                }
            }
            eprintln!(
                "{} replayed: {charged} charged, {rejected} still rejected",
                ids.len()
            );
            Ok(())
        }
        DeadLetterCommand::Discard { id, note } => {
            let body = serde_json::json!({ "note": note });
            let letter = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/dead-letters/{id}/discard"),
                    Some(body),
                )
                .await?;
            println!("{}", line(&letter));
            Ok(())
        }
    }
}
