//! `tally dead-letters`: list and replay the events that could not be
//! charged, through a running server's API (a replay is a write, and only the
//! server's writer writes).

use anyhow::{bail, Context};
use serde_json::Value;
// The code of a letter that holds no event to replay (the server refuses it).
use tally_server::ingest::UNREADABLE;

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
    #[arg(long, env = "TALLY_API_KEY", global = true, hide_env_values = true)]
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

/// The server answered with an error.
#[derive(Debug)]
struct Refused {
    status: reqwest::StatusCode,
    code: String,
    message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// Whether the same request may succeed later (the server unavailable,
    /// overloaded or failing over), rather than being refused for good.
    fn may_pass_later(&self) -> bool {
        self.status.is_server_error()
            || self.status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || self.status == reqwest::StatusCode::REQUEST_TIMEOUT
    }
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
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')))
            .query(query)
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.url))?;
        let status = response.status();
        let body: Option<Value> = response.json().await.ok();
        if status.is_success() && !body.as_ref().is_some_and(Value::is_object) {
            // Another server than Tally (a wrong --url): nothing it said counts.
            bail!(
                "the server at {} answered {status} without a JSON object: is --url a Tally server?",
                self.url
            );
        }
        let body = body.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(Refused {
                status,
                code: body["error"]["code"].as_str().unwrap_or("").to_owned(),
                message: body["error"]["message"]
                    .as_str()
                    .unwrap_or("no message")
                    .to_owned(),
            }
            .into());
        }
        Ok(body)
    }

    /// The dead letters of `status` (and `source`), oldest first, a page
    /// at a time to `each_page`.
    async fn letters(
        &self,
        status: &str,
        source: Option<&str>,
        mut each_page: impl FnMut(&[Value]),
    ) -> anyhow::Result<()> {
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("status", status), ("limit", "1000")];
            query.extend(source.map(|source| ("source", source)));
            query.extend(cursor.as_deref().map(|cursor| ("cursor", cursor)));
            let page = self
                .call(reqwest::Method::GET, "/v1/dead-letters", &query, None)
                .await?;
            each_page(page["data"].as_array().map_or(&[], Vec::as_slice));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return Ok(()),
            }
        }
    }
}

/// A dead letter's id as given on the command line: `dl_<n>`. Anything
/// else is refused before a request is built from it (a `/` or `?` in it
/// would name another route: `dl_2/discard?` replayed as a discard).
fn letter_id(id: &str) -> anyhow::Result<&str> {
    let number = id.strip_prefix("dl_").unwrap_or("");
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{id:?} is not a dead letter id (they look like dl_12; tally dead-letters list shows them)");
    }
    Ok(id)
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
            // The header once the first page came (not before an error).
            let mut first = true;
            api.letters(&status, source.as_deref(), |page| {
                if std::mem::take(&mut first) {
                    crate::print_line(
                        "id\tstatus\tsource\tevent\tcustomer\tcode\tattempts\tmessage",
                    );
                }
                for letter in page {
                    crate::print_line(line(letter));
                }
            })
            .await
        }
        DeadLetterCommand::Replay { ids, all } => {
            let mut unreadable = 0;
            let ids: Vec<String> = if all {
                let mut pending = Vec::new();
                api.letters("pending", None, |page| {
                    for letter in page {
                        // Nothing to send again: left for `discard`.
                        if letter["code"] == UNREADABLE {
                            unreadable += 1;
                            continue;
                        }
                        pending.extend(letter["id"].as_str().map(str::to_owned));
                    }
                })
                .await?;
                pending
            } else if ids.is_empty() {
                bail!("give dead letter ids (dl_1 ...) or --all");
            } else {
                for id in &ids {
                    letter_id(id)?;
                }
                ids
            };
            // Each letter on its own: one that fails (a 503 while the
            // writer fails over, a 409 for one discarded meanwhile) is
            // reported and the others are still tried.
            let (mut charged, mut duplicate, mut rejected) = (0, 0, 0);
            let (mut failed, mut refused) = (0, 0);
            for id in &ids {
                let replay = match api
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/dead-letters/{id}/replay"),
                        &[],
                        None,
                    )
                    .await
                {
                    Ok(replay) => replay,
                    Err(error) => {
                        // Refused for good (not found, discarded, nothing
                        // to replay, no permission), or maybe not.
                        match error.downcast_ref::<Refused>() {
                            Some(answer) if !answer.may_pass_later() => {
                                refused += 1;
                                crate::print_report(format_args!(
                                    "{id}\trefused\t{}\t{}",
                                    answer.code, answer.message
                                ));
                            }
                            _ => {
                                failed += 1;
                                crate::print_report(format_args!("{id}\tfailed\t{error:#}"));
                            }
                        }
                        continue;
                    }
                };
                match replay["result"]["status"].as_str().unwrap_or("?") {
                    "charged" => {
                        charged += 1;
                        crate::print_report(format_args!("{id}\tcharged"));
                    }
                    "duplicate" => {
                        duplicate += 1;
                        crate::print_report(format_args!("{id}\tduplicate"));
                    }
                    status => {
                        rejected += 1;
                        crate::print_report(format_args!(
                            "{id}\t{status}\t{}",
                            replay["result"]["error"]["code"].as_str().unwrap_or("?")
                        ));
                    }
                }
            }
            eprintln!(
                "{} dead letter(s): {charged} charged, {duplicate} already charged, {rejected} still rejected, \
                 {refused} refused by the server, {failed} not replayed",
                ids.len()
            );
            if unreadable > 0 {
                eprintln!(
                    "{unreadable} pending dead letter(s) hold no event to replay ({UNREADABLE}): \
                     discard them with tally dead-letters discard"
                );
            }
            match (failed, refused) {
                (0, 0) if rejected == 0 => Ok(()),
                // Nothing the server refused: these were replayed, and the
                // event was refused again (exit 1, so a script can tell).
                (0, 0) => bail!(
                    "{rejected} dead letter(s) are still rejected (see their lines): fix the cause, \
                     then replay them again"
                ),
                (0, refused) => bail!(
                    "{refused} dead letter(s) were refused by the server (see their lines); running \
                     the command again as it is will not change that"
                ),
                (failed, _) => bail!(
                    "{failed} dead letter(s) could not be replayed for now (the server unreachable \
                     or unavailable); run the command again for them"
                ),
            }
        }
        DeadLetterCommand::Discard { id, note } => {
            let id = letter_id(&id)?;
            let body = serde_json::json!({ "note": note });
            let letter = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/dead-letters/{id}/discard"),
                    &[],
                    Some(body),
                )
                .await?;
            crate::print_line(line(&letter));
            Ok(())
        }
    }
}
