//! The webhook delivery worker: sends what the store's outbox holds, signed,
//! at least once, with a stable delivery id, and records every attempt
//! through the writer (which schedules retries with backoff on the engine's
//! clock and gives up after a bounded number of attempts).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tally_store::{Command, DueDelivery};

use crate::AppState;

/// How often the worker looks for due deliveries when none has finished.
const POLL: Duration = Duration::from_millis(200);
/// After a delivery finishes, the worker waits this long for others to
/// finish before it looks again (one read for several).
const SETTLE: Duration = Duration::from_millis(1);
/// A receiver has this long to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver that does not accept the connection within this is retried later.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deliveries in flight to one endpoint at once. Each endpoint has its own:
/// one whose receiver hangs holds up none of the others' (it held up every
/// endpoint's next deliveries by the 10 s timeout, a probe found).
const PER_ENDPOINT: usize = 16;
/// Deliveries in flight at once over all endpoints (sockets are bounded).
const IN_FLIGHT: usize = 256;

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
        // A redirect is not followed: it is not a 2xx (retried), and the
        // signed body and its headers go to the endpoint's URL only.
        let client = match reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(4)
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot build the webhook client; webhooks are not delivered");
                return;
            }
        };
        let worker = Worker {
            client,
            state,
            in_flight: Default::default(),
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            finished: Default::default(),
            unrecorded: Default::default(),
        };
        let worker = std::sync::Arc::new(worker);
        loop {
            // Several servers over one database: only the server that runs
            // the writer delivers, while it runs it.
            worker.state.store.wait_until_leader().await;
            // The store could not record an attempt: those deliveries are
            // still due; wait the full interval before sending them again.
            if worker.unrecorded.swap(false, Ordering::Relaxed) {
                tokio::time::sleep(POLL).await;
            }
            worker.clone().start_due().await;
            // Until a delivery finishes (a slot is free), at most POLL.
            let _ = tokio::time::timeout(POLL, worker.finished.notified()).await;
            tokio::time::sleep(SETTLE).await;
        }
    })
}

/// The delivery worker's state: what is in flight, per endpoint.
struct Worker {
    client: reqwest::Client,
    state: AppState,
    /// Delivery ids in flight, per endpoint id.
    in_flight: Mutex<HashMap<String, HashSet<String>>>,
    /// At most [`IN_FLIGHT`] at once, over all endpoints.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    finished: tokio::sync::Notify,
    unrecorded: AtomicBool,
}

impl Worker {
    /// Start each endpoint's due deliveries, up to [`PER_ENDPOINT`] in
    /// flight for each and [`IN_FLIGHT`] in all.
    async fn start_due(self: std::sync::Arc<Self>) {
        // Only the endpoints with something due are read (one query), then
        // each one's due deliveries.
        let endpoints = match self.state.store.due_endpoints().await {
            Ok(endpoints) => endpoints,
            Err(error) => {
                tracing::warn!(%error, "cannot read due webhook deliveries");
                return;
            }
        };
        for endpoint_id in endpoints {
            let busy = self.busy(&endpoint_id);
            if busy.len() >= PER_ENDPOINT {
                continue;
            }
            // Those in flight are still due until their attempt is recorded.
            let limit = i64::try_from(PER_ENDPOINT + busy.len()).unwrap_or(i64::MAX);
            let due = match self
                .state
                .store
                .due_deliveries_of(endpoint_id.clone(), limit)
                .await
            {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, endpoint = %endpoint_id, "cannot read due webhook deliveries");
                    continue;
                }
            };
            let new = due
                .into_iter()
                .filter(|d| !busy.contains(&d.id))
                .take(PER_ENDPOINT - busy.len());
            for delivery in new {
                // A server that no longer runs the writer sends nothing more
                // (the new writer sends what is still pending).
                if !self.state.store.is_leader() {
                    return;
                }
                let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                    return;
                };
                self.in_flight
                    .lock()
                    .expect("in flight")
                    .entry(endpoint_id.clone())
                    .or_default()
                    .insert(delivery.id.clone());
                let done = Done {
                    worker: self.clone(),
                    endpoint_id: delivery.endpoint_id.clone(),
                    delivery_id: delivery.id.clone(),
                    _slot: slot,
                };
                tokio::spawn(async move {
                    let recorded = deliver(&done.worker.client, &done.worker.state, delivery).await;
                    if !recorded {
                        done.worker.unrecorded.store(true, Ordering::Relaxed);
                    }
                    // `done` drops here (or when the task panics): the
                    // delivery leaves the in-flight set and frees its slot.
                });
            }
        }
    }

    fn busy(&self, endpoint_id: &str) -> HashSet<String> {
        self.in_flight
            .lock()
            .expect("in flight")
            .get(endpoint_id)
            .cloned()
            .unwrap_or_default()
    }
}

/// A delivery in flight: when dropped (its task ended, even by a panic), it
/// leaves the in-flight set, frees its slot and wakes the worker.
struct Done {
    worker: std::sync::Arc<Worker>,
    endpoint_id: String,
    delivery_id: String,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Ok(mut in_flight) = self.worker.in_flight.lock() {
            if let Some(ids) = in_flight.get_mut(&self.endpoint_id) {
                ids.remove(&self.delivery_id);
            }
        }
        self.worker.finished.notify_one();
    }
}

/// `Tally-Signature`: `t=<t>,v1=<under the secret>`, and a second `v1` under
/// the secret before the last rotation while that one is still valid.
fn signature_header(delivery: &DueDelivery, timestamp: u64) -> String {
    let mut header = format!(
        "t={timestamp},v1={}",
        sign(&delivery.secret, timestamp, &delivery.body)
    );
    if let Some(previous) = &delivery.previous_secret {
        header.push_str(",v1=");
        header.push_str(&sign(previous, timestamp, &delivery.body));
    }
    header
}

/// Send one delivery and record the attempt; false when it could not be recorded.
async fn deliver(client: &reqwest::Client, state: &AppState, delivery: DueDelivery) -> bool {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sent = client
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("tally-signature", signature_header(&delivery, timestamp))
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
        Err(error) if error.is_timeout() => (
            false,
            None,
            Some(format!(
                "the receiver did not answer within {} s",
                TIMEOUT.as_secs()
            )),
        ),
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
