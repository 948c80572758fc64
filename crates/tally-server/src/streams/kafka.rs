//! The Kafka consumer (to be built).

use super::StreamArgs;
use crate::AppState;

pub fn start(state: AppState, args: &StreamArgs) -> anyhow::Result<()> {
    let _ = (state, args);
    anyhow::bail!("the Kafka consumer is not built yet")
}
