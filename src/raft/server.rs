//! Raft's RPC server: answers `warden.<cluster>.raft.<my_id>.<rpc>` by handing each request to
//! the local openraft instance and replying with its rmp-serde encoded result.

use std::future::Future;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinSet;

use super::typ::*;
use crate::subjects::Subjects;
use crate::subjects::{RPC_APPEND, RPC_SNAPSHOT, RPC_VOTE};

/// Subscribes to this node's Raft subjects. Returns once subscribed, so that peers can reach
/// the node before it asks to join; the serving loop runs until `shutdown`.
pub async fn start(
    client: async_nats::Client,
    subjects: Subjects,
    id: NodeId,
    raft: Raft,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sub = client.subscribe(subjects.raft_all(id)).await?;
    client.flush().await?;
    Ok(tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    let (raft, client) = (raft.clone(), client.clone());
                    tasks.spawn(async move { serve(raft, client, msg).await });
                }
            }
        }
        tasks.abort_all();
    }))
}

async fn serve(raft: Raft, client: async_nats::Client, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let rpc = Subjects::last_token(&msg.subject);
    let body = match rpc {
        RPC_APPEND => {
            answer(&msg.payload, |r: AppendEntriesRequest| {
                raft.append_entries(r)
            })
            .await
        }
        RPC_VOTE => answer(&msg.payload, |r: VoteRequest| raft.vote(r)).await,
        RPC_SNAPSHOT => {
            answer(&msg.payload, |r: InstallSnapshotRequest| {
                raft.install_snapshot(r)
            })
            .await
        }
        other => {
            tracing::warn!(rpc = other, "unknown Raft RPC");
            return;
        }
    };
    match body {
        Ok(body) => {
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "could not reply to a Raft RPC");
            }
        }
        // A request we cannot decode comes from an incompatible peer; the sender times out and
        // retries, which is the best that can happen until the versions match.
        Err(e) => tracing::warn!(rpc, error = %e, "undecodable Raft RPC"),
    }
}

async fn answer<Req, Resp, E, F, Fut>(payload: &[u8], handle: F) -> anyhow::Result<Vec<u8>>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    E: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    let req: Req = rmp_serde::from_slice(payload)?;
    let result = handle(req).await;
    Ok(rmp_serde::to_vec_named(&result)?)
}
