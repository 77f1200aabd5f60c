//! `logs -f` and `events -f` across an `upgrade-self`.
//!
//! When the daemon hands over to a new binary, the old image ends every
//! follow stream with [`handover_status`] (UNAVAILABLE, marked with the
//! [`HANDOVER_KEY`] metadata entry) rather than a plain end, which still
//! means "the daemon is shutting down". A follower that sees it connects
//! again (its connect waits in the socket's backlog until the new image
//! accepts), asks for the whole history again and skips what it printed
//! already: everything older than the last item it printed, and at that
//! item's millisecond, as many equal items as it printed there. The log
//! ring buffer and the event history are handed over whole, so nothing is
//! missed unless the buffer rotated past the last item printed meanwhile.

use crate::control::{self, Client};
use plugvisor_proto as pb;
use std::path::Path;
use tonic::{Status, Streaming};

/// Marks a follow stream ended by a hand-over.
pub const HANDOVER_KEY: &str = "plugvisor-handover";

/// How a follow stream ends when the daemon hands over to a new binary.
pub fn handover_status() -> Status {
    let mut status = Status::unavailable(
        "the daemon is switching to a new binary (upgrade-self); connect again to follow on",
    );
    status.metadata_mut().insert(
        HANDOVER_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

/// Whether a follow stream was ended by a hand-over.
pub fn is_handover(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.metadata().contains_key(HANDOVER_KEY)
}

/// An item of a follow stream.
pub trait Followed: Clone + PartialEq + Send + 'static {
    type Request: Clone + Send;
    fn time_ms(&self) -> u64;
    /// Opens the stream (again, with `request` then asking for the whole
    /// history).
    fn open(
        client: &mut Client,
        request: Self::Request,
    ) -> impl Future<Output = Result<Streaming<Self>, Status>> + Send;
}

impl Followed for pb::LogLine {
    type Request = pb::LogsRequest;
    fn time_ms(&self) -> u64 {
        self.time_ms
    }
    async fn open(
        client: &mut Client,
        request: pb::LogsRequest,
    ) -> Result<Streaming<Self>, Status> {
        Ok(client.logs(request).await?.into_inner())
    }
}

impl Followed for pb::Event {
    type Request = pb::EventsRequest;
    fn time_ms(&self) -> u64 {
        self.time_ms
    }
    async fn open(
        client: &mut Client,
        request: pb::EventsRequest,
    ) -> Result<Streaming<Self>, Status> {
        Ok(client.events(request).await?.into_inner())
    }
}

/// What was printed last: its millisecond and the items printed in it.
#[derive(Default)]
struct Seen<T> {
    time_ms: u64,
    items: Vec<T>,
}

impl<T: Followed> Seen<T> {
    fn printed(&mut self, item: &T) {
        if item.time_ms() != self.time_ms {
            self.time_ms = item.time_ms();
            self.items.clear();
        }
        self.items.push(item.clone());
    }

    /// After a reconnect: whether `item` of the history sent again was
    /// printed already (each printed item matches once).
    fn skip(&self, item: &T, matched: &mut [bool]) -> bool {
        if item.time_ms() < self.time_ms {
            return true;
        }
        if item.time_ms() > self.time_ms {
            return false;
        }
        for (i, seen) in self.items.iter().enumerate() {
            if !matched[i] && seen == item {
                matched[i] = true;
                return true;
            }
        }
        false
    }
}

/// Prints `first`'s stream with `print`; with `follow`, carries on across
/// hand-overs by opening `again` (the whole history, followed) and skipping
/// what was printed.
pub async fn run<T: Followed>(
    socket: &Path,
    first: T::Request,
    again: T::Request,
    follow: bool,
    mut print: impl FnMut(&T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut client = control::connect(socket).await?;
    let mut stream = T::open(&mut client, first).await?;
    let mut seen = Seen::<T> {
        time_ms: 0,
        items: Vec::new(),
    };
    let mut resumed: Option<Vec<bool>> = None;
    loop {
        match stream.message().await {
            Ok(Some(item)) => {
                if let Some(matched) = resumed.as_mut() {
                    if seen.skip(&item, matched) {
                        continue;
                    }
                    resumed = None;
                }
                print(&item)?;
                seen.printed(&item);
            }
            Ok(None) => return Ok(()),
            Err(status) if follow && is_handover(&status) => {
                tracing::debug!("{}", status.message());
                client = control::connect(socket).await?;
                stream = T::open(&mut client, again.clone()).await?;
                resumed = Some(vec![false; seen.items.len()]);
            }
            Err(status) => return Err(status.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(time_ms: u64, text: &str) -> pb::LogLine {
        pb::LogLine {
            time_ms,
            line: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn history_sent_again_is_skipped_up_to_the_last_item_printed() {
        let mut seen = Seen::default();
        for l in [line(1, "a"), line(2, "b"), line(2, "b")] {
            seen.printed(&l);
        }
        let mut matched = vec![false; seen.items.len()];
        // Older, and both equal lines of the last millisecond: printed.
        assert!(seen.skip(&line(1, "a"), &mut matched));
        assert!(seen.skip(&line(2, "b"), &mut matched));
        assert!(seen.skip(&line(2, "b"), &mut matched));
        // A third equal line in the same millisecond, and anything later:
        // new.
        assert!(!seen.skip(&line(2, "b"), &mut matched));
        assert!(!seen.skip(&line(3, "a"), &mut matched));
    }

    #[test]
    fn only_a_marked_unavailable_is_a_hand_over() {
        assert!(is_handover(&handover_status()));
        assert!(!is_handover(&Status::unavailable("daemon gone")));
        let mut other = Status::internal("x");
        other.metadata_mut().insert(
            HANDOVER_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        assert!(!is_handover(&other));
    }
}
