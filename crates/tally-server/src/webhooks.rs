//! The webhook delivery worker: sends what the store's outbox holds, signed,
//! at least once, with a stable delivery id, and records every attempt
//! through the writer (which schedules retries with backoff on the engine's
//! clock and gives up after a bounded number of attempts).

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tally_store::{Command, DueDelivery};

use crate::AppState;

/// How often the worker looks for due deliveries when there were none.
const POLL: Duration = Duration::from_millis(200);
/// A receiver has this long to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver that does not accept the connection within this is retried later.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deliveries attempted at once.
const BATCH: i64 = 64;

/// `v1` of `Tally-Signature`: hex HMAC-SHA256 of `"<t>.<body>"` under the
/// endpoint's secret.
pub fn sign(secret: &str, timestamp: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Deliver due webhooks forever.
pub fn spawn_deliveries(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot build the webhook client; webhooks are not delivered");
                return;
            }
        };
        loop {
            // Several servers over one database: only the server that runs
            // the writer delivers, while it runs it.
            state.store.wait_until_leader().await;
            match state.store.due_deliveries(BATCH).await {
                Ok(due) if !due.is_empty() => {
                    let attempts = due.into_iter().map(|d| deliver(&client, &state, d));
                    let recorded = futures_util::future::join_all(attempts).await;
                    if recorded.iter().all(|r| *r) {
                        continue;
                    }
                    // The store could not record an attempt: those deliveries
                    // are still due; wait before sending them again.
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot read due webhook deliveries"),
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// Send one delivery and record the attempt; false when it could not be recorded.
async fn deliver(client: &reqwest::Client, state: &AppState, delivery: DueDelivery) -> bool {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let signature = sign(&delivery.secret, timestamp, &delivery.body);
    let sent = client
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("tally-signature", format!("t={timestamp},v1={signature}"))
        .header("tally-delivery-id", &delivery.id)
        .body(delivery.body.clone())
        .send()
        .await;
    let (ok, status, error) = match sent {
        Ok(response) => {
            let status = response.status();
            let error = (!status.is_success()).then(|| format!("the receiver answered {status}"));
            (status.is_success(), Some(status.as_u16()), error)
        }
        Err(error) => (false, None, Some(error.to_string())),
    };
    state.metrics.webhook_attempt(ok);
    let command = Command::RecordDelivery {
        delivery_id: delivery.id.clone(),
        ok,
        status,
        error,
    };
    match state.store.execute(command, None).await {
        Ok(_) => true,
        Err(error) => {
            // The attempt is not recorded: the delivery stays due and is sent again.
            tracing::warn!(%error, delivery = %delivery.id, "cannot record a webhook attempt");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 shape: key "Jefe", message as given.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let signed = sign("whsec_x", 1_700_000_000, "{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_x").unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(signed, hex::encode(mac.finalize().into_bytes()));
    }
}
