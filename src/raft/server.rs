//! Raft's RPC server: answers `warden.<cluster>.internal.<from>.<my_id>.raft.v<n>.<rpc>` by
//! handing each request to the local openraft instance and replying with its rmp-serde encoded
//! result. The sender is the `<from>` of the subject, which only its identity may publish on;
//! a request whose body speaks for another node (its vote names another candidate or leader)
//! is dropped, so a node's credential cannot campaign or lead as another node. A pre-vote
//! (`raft::election`) speaks only for its sender, and changes nothing.

use std::future::Future;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinSet;

use super::election::Election;
use super::typ::*;
use crate::subjects::Subjects;
use crate::subjects::{RPC_APPEND, RPC_PREVOTE, RPC_SNAPSHOT, RPC_VOTE};
use std::sync::Arc;

/// Subscribes to this node's Raft subjects. Returns once subscribed, so that peers can reach
/// the node before it asks to join; the serving loop runs until `shutdown`.
pub async fn start(
    client: async_nats::Client,
    subjects: Subjects,
    id: NodeId,
    raft: Raft,
    election: Arc<Election>,
    commit: Arc<super::CommitIndex>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sub = client.subscribe(subjects.raft_to(id)).await?;
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
                    let (raft, client, election) = (raft.clone(), client.clone(), election.clone());
                    let commit = commit.clone();
                    let Some(from) = subjects.parse_internal(&msg.subject).map(|s| s.from) else {
                        continue;
                    };
                    // Answered only where only this node may publish and only the sender
                    // listens (`peers`).
                    match &msg.reply {
                        Some(r) if subjects.is_reply_for(r, Some(id), from) => {}
                        _ => continue,
                    }
                    tasks.spawn(async move { serve(raft, election, &commit, client, from, msg).await });
                }
            }
        }
        tasks.abort_all();
    }))
}

async fn serve(
    raft: Raft,
    election: Arc<Election>,
    commit: &super::CommitIndex,
    client: async_nats::Client,
    from: NodeId,
    msg: async_nats::Message,
) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let rpc = Subjects::last_token(&msg.subject);
    let body = match rpc {
        RPC_APPEND => {
            answer(
                &msg.payload,
                from,
                |r: &AppendEntriesRequest| r.vote,
                |r| async {
                    let leads = r.vote.is_committed();
                    let leader_commit = r.leader_commit;
                    let res = raft.append_entries(r).await;
                    // Accepted from an elected leader: this node hears it (`Election::heard`).
                    if leads && matches!(&res, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_)))
                    {
                        election.heard(from);
                        commit.saw(leader_commit);
                    }
                    res
                },
            )
            .await
        }
        RPC_VOTE => {
            answer(
                &msg.payload,
                from,
                |r: &VoteRequest| r.vote,
                |r| raft.vote(r),
            )
            .await
        }
        RPC_SNAPSHOT => {
            answer(
                &msg.payload,
                from,
                |r: &SnapshotChunk| r.vote,
                |r| raft.install_snapshot(r.into()),
            )
            .await
        }
        RPC_PREVOTE => match crate::inputs::pre_vote(&msg.payload) {
            // One question per asker at a time: a flood from one peer costs one answer.
            Ok(ask) => match election.answer(from, ask).await {
                Some(reply) => rmp_serde::to_vec_named(&reply).map_err(anyhow::Error::from),
                None => return,
            },
            Err(e) => Err(anyhow::Error::from(e)),
        },
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

/// Decodes a request, checks that the node its vote names (the candidate, or the leader) is
/// the sender, and hands it to `handle`.
async fn answer<Req, Resp, E, F, Fut>(
    payload: &[u8],
    from: NodeId,
    vote: impl FnOnce(&Req) -> Vote,
    handle: F,
) -> anyhow::Result<Vec<u8>>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    E: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    let req: Req = crate::protocol::from_msgpack(payload)?;
    let speaks_for = vote(&req).leader_id().voted_for();
    anyhow::ensure!(
        speaks_for == Some(from),
        "node {from} sent a request for node {speaks_for:?}; dropped"
    );
    let result = handle(req).await;
    Ok(rmp_serde::to_vec_named(&result)?)
}
